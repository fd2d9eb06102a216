"""The pass contract (docs/writing-passes.md), checked over every built-in pass.

* idempotence: a pass that claims it (``idempotent = True``, the default), run a second time right after the
  first on a fixture pipeline state, changes nothing (no ``modified``, the same exported model); a pass that is
  not idempotent says so (``idempotent = False``);
* per-run state: a pass instance holds nothing but its options after a run (everything a run computes lives
  in locals or a per-run object);
* ordering: a pass that ``invalidates`` a property an earlier pass established is refused by the pass manager
  before anything runs, with the pass's own reason; invalidated properties are dropped;
* :class:`GraphPass` runs without a context; :class:`Sequential` merges its children's statistics and declares
  their properties; ``lower`` runs the target's lowering passes, each timed, through the manager.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompiler import ir
from qcompiler.calib import CalibrationSource, input_signatures
from qcompiler.core.context import CompileContext
from qcompiler.core.errors import UserError
from qcompiler.core.pass_base import GraphPass, Pass, PassResult, Sequential
from qcompiler.core.pass_manager import PassManager
from qcompiler.core.registry import build_pipeline, registry, targets
from qcompiler.plan import Plan, required_opset
from qcompiler.runtime_targets import DEFAULT_PIPELINE, get_target
from qcompiler.session import keeps_float_function

MODELS = Path(__file__).resolve().parent.parent / "models"
#: the default pipeline, the passes a property-requiring pass is preceded by
PREFIX = DEFAULT_PIPELINE.split(",")
#: passes that need a transformer (LayerNorm -> MatMul sites, MatMul weights) to do anything
TRANSFORMER = {"smooth", "gptq", "lower-matmulnbits", "ort-dynamic-matmul", "ort-per-token-matmul"}
#: plans that give a target's lowering something to rewrite
INT4_WEIGHT_ONLY = {"version": 1, "rules": [{"match": {"op_type": "MatMul"},
                                              "weight": {"dtype": "int4", "granularity": "block"},
                                              "activation": {"dtype": "float"}}]}
PLANS = {
    "lower-matmulnbits": INT4_WEIGHT_ONLY,
    "gptq": INT4_WEIGHT_ONLY,
    "ort-dynamic-matmul": {"version": 1, "rules": [{"match": {"op_type": "MatMul"},
                                                    "activation": {"calibration": "dynamic"}}]},
    "ort-per-token-matmul": {"version": 1, "rules": [{"match": {"op_type": "MatMul"},
                                                      "activation": {"calibration": "dynamic",
                                                                     "granularity": "per_token"}}]},
    "lower-packed": {"version": 1, "rules": [{"match": {"name_regex": "^block"}, "weight": {"scheme": "ternary"}}]},
    "lower-qonnx-quant": {"version": 1, "rules": [{"match": {"name_regex": "^block"},
                                                   "weight": {"scheme": "ternary"}}]},
}


def _builtins() -> list[str]:
    reg = registry()
    return sorted(n for n, origin in reg.origin.items() if origin == "built-in")


def _target_of(name: str) -> tuple[str, list[str]]:
    """The first built-in target whose lowering runs ``name`` (else ``ort``) and the lowering passes before it."""
    for tname, cls in sorted(targets().items()):
        if name in cls.lowering:
            return tname, list(cls.lowering[:cls.lowering.index(name)])
    return "ort", []


def _prefix(p: Pass, before: list[str]) -> list[str]:
    """The shortest prefix of the default pipeline that establishes what ``p`` requires, then the target's
    lowering passes that run before ``p``."""
    reg = registry()
    have = {"model"}
    out: list[str] = []
    for name in PREFIX:
        if set(p.requires) <= have:
            break
        out.append(name)
        cls = reg.get(name)
        have = (have - set(cls.invalidates)) | set(cls.produces)
    return [*out, *before]


def _fixture(name: str) -> tuple[CompileContext, Pass]:
    model = "transformer_block" if name in TRANSFORMER else "conv_bn_relu"
    target, before = _target_of(name)
    graph, meta = ir.import_graph(onnx.load(str(MODELS / f"{model}.onnx")))
    feeds = [dict(np.load(MODELS / f"{model}.npz"))]
    samples = [{k: v[i] for k, v in feeds[0].items()} for i in range(4)]
    plan = Plan.from_dict(PLANS[name]) if name in PLANS else Plan.default()
    need, _ = required_opset(
        [s for np_ in plan.resolve(graph, warn=False).nodes.values() for s in (np_.weight, np_.activation) if s])
    if ir.opset_of(ir.export_model(graph, meta)) < need:
        graph, meta = ir.import_graph(ir.upgrade_opset(ir.export_model(graph, meta), need, "test"))
    ctx = CompileContext(graph=graph, meta=meta, plan=plan, target=get_target(target),
                         calib=CalibrationSource.from_feeds(samples, input_signatures(graph)))
    p = build_pipeline(name)[0]
    prefix = _prefix(p, before)
    if prefix:
        PassManager(build_pipeline(",".join(prefix))).run(ctx)
    return ctx, p


@pytest.mark.parametrize("name", _builtins())
def test_idempotent_passes_change_nothing_the_second_time(name):
    ctx, p = _fixture(name)
    state_before = dict(vars(p))
    PassManager([p]).run(ctx)
    first = ir.export_model(ctx.graph, ctx.meta).SerializeToString()
    # no per-run state on the pass object: it holds what it held before the run (its options)
    assert vars(p).keys() == state_before.keys(), (name, sorted(set(vars(p)) - set(state_before)))
    if not type(p).idempotent:
        return  # said so: a second run would do its work again
    again = PassManager([p]).run(ctx)[-1]
    assert again.modified is False, (name, again.stats)
    assert ir.export_model(ctx.graph, ctx.meta).SerializeToString() == first, name


def test_every_builtin_is_covered():
    names = _builtins()
    # the target lowerings are registered passes (nameable in pipeline text), not hidden inside ``lower``
    for cls in targets().values():
        assert set(cls.lowering) <= set(names), cls.name
    assert {"cleanup", "lower", "lower-packed", "trt-check-rules", "lower-qoperator"} <= set(names)


# ------------------------------------------------------------------------------------------------ ordering
@pytest.mark.parametrize("pipeline, message", [
    ("resolve-plan,calibrate,smooth",
     "pipeline: 'smooth' must run before 'calibrate' (it changes the activation ranges)"),
    ("resolve-plan,calibrate,insert-qdq,gptq",
     "pipeline: 'gptq' must run before 'insert-qdq' (it chooses the weights' codes)"),
    ("resolve-plan,calibrate,insert-qdq,bias-correct",
     "pipeline: 'bias-correct' must run before 'insert-qdq' (it corrects float biases)"),
])
def test_invalidating_pass_out_of_order_is_refused_before_anything_runs(pipeline, message, monkeypatch):
    ran: list[str] = []
    monkeypatch.setattr(PassManager, "_run_step", lambda self, step, ctx, top: ran.append(step.p.name))
    ctx = _fixture("cleanup")[0]
    with pytest.raises(UserError) as e:
        PassManager(build_pipeline(pipeline)).run(ctx)
    assert str(e.value) == message and ran == []


class _Make(Pass):
    name = "make-x"
    produces = frozenset({"x"})

    def run(self, ctx: CompileContext) -> PassResult:
        return PassResult(False, Counter(made=1))


class _Break(Pass):
    name = "break-x"
    invalidates = frozenset({"x"})

    def run(self, ctx: CompileContext) -> PassResult:
        return PassResult(True, Counter(broke=2))


class _NeedX(Pass):
    name = "need-x"
    requires = frozenset({"x"})

    def run(self, ctx: CompileContext) -> PassResult:
        return PassResult()


def test_invalidated_properties_are_dropped():
    ctx = _fixture("cleanup")[0]
    PassManager([_Break(), _Make()]).run(ctx)
    assert "x" in ctx.properties
    with pytest.raises(UserError, match=r"^pipeline: 'break-x' must run before 'make-x'$"):
        PassManager([_Make(), _Break()]).check({"model"})
    # a Sequential declares its children's properties; what an earlier child produces is not required outside
    seq = Sequential([_Make(), _NeedX()])
    assert seq.requires == frozenset() and seq.produces == {"x"}
    assert Sequential([_NeedX(), _Make()]).requires == {"x"}


# ---------------------------------------------------------------------------------------- pass kinds
def test_graph_pass_runs_without_a_context():
    graph, _ = ir.import_graph(onnx.load(str(MODELS / "conv_bn_relu.onnx")))
    cleanup = registry().get("cleanup")()
    assert isinstance(cleanup, GraphPass)
    first = cleanup.run_graph(graph)
    assert isinstance(first, PassResult)
    assert cleanup.run_graph(graph).modified is False
    for name in ("fold-bias", "fuse-activations", "lower-qoperator", "trt-check-rules"):
        assert issubclass(registry().get(name), GraphPass), name


def test_sequential_merges_child_stats_and_lower_times_each_child():
    ctx = _fixture("cleanup")[0]
    seq = Sequential([_Break(), _Make()])
    rec = PassManager([seq]).run(ctx)[0]
    assert rec.modified is True and rec.stats == {"make-x.made": 1, "break-x.broke": 2}
    assert [c.name for c in rec.children] == ["break-x", "make-x"] and all(c.seconds > 0 for c in rec.children)
    assert "x" in ctx.properties
    with pytest.raises(UserError, match=r"^pipeline: 'break-x' must run before 'make-x'$"):
        PassManager([Sequential([_Make(), _Break()])]).run(_fixture("cleanup")[0])  # the children's order is checked too
    # lower: one record, as before, its statistics those of the target's lowering passes
    ctx, lower = _fixture("lower")
    rec = PassManager([lower]).run(ctx)[0]
    assert rec.name == "lower" and [c.name for c in rec.children] == list(get_target("ort").lowering)
    assert set(rec.to_json()) == {"pass", "modified", "seconds", "stats"}
    assert all(k.split(".", 1)[0] in get_target("ort").lowering for k in rec.stats)


def test_lowering_child_is_dumped_when_named(tmp_path):
    ctx, lower = _fixture("lower")
    PassManager([lower], dump_after={"ort-load-time-dequant"}, dump_dir=tmp_path).run(ctx)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["01-lower.07-ort-load-time-dequant.onnx"]
    with pytest.raises(UserError, match="--dump-after: no pass named 'nope' in the pipeline"):
        PassManager([lower], dump_after={"nope"}, dump_dir=tmp_path)


def test_nested_sequential_runs_every_leaf_through_the_manager():
    class Group(Sequential):
        name = "group"

    ctx = _fixture("cleanup")[0]
    rec = PassManager([Group([Group([_Break()]), _Make()]), _NeedX()]).run(ctx)
    assert [r.name for r in rec] == ["group", "need-x"]
    assert [c.name for c in rec[0].children] == ["group", "make-x"]
    assert [c.name for c in rec[0].children[0].children] == ["break-x"]
    assert rec[0].stats == {"group.break-x.broke": 2, "make-x.made": 1} and "x" in ctx.properties


# ------------------------------------------------------------------------------------ keeps_function
FUNCTION_MODELS = ("conv_bn_relu", "convtranspose_bn", "depthwise", "gemm_head", "opset11_constants",
                   "shared_weight", "transformer_block")


def _exporter_chains() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Conv, then its bias as a separate per-channel Add (fold-bias), then hard-swish spelled out as
    ``x * clip(x + 3, 0, 6) / 6`` (fuse-activations); beside it a Conv scaled per channel by a Mul (fold-scale):
    the exporter patterns no file in models/ has."""
    rng = np.random.default_rng(0)
    consts = {"w": rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "c": rng.normal(size=(1, 4, 1, 1)).astype(np.float32),
              "three": np.array(3, np.float32), "zero": np.array(0, np.float32), "six": np.array(6, np.float32),
              "w2": rng.normal(size=(4, 3, 1, 1)).astype(np.float32), "s": rng.normal(size=(4, 1, 1)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["y", "c"], ["yb"]),
             helper.make_node("Add", ["yb", "three"], ["a"]), helper.make_node("Clip", ["a", "zero", "six"], ["cl"]),
             helper.make_node("Mul", ["yb", "cl"], ["m"]), helper.make_node("Div", ["m", "six"], ["out"]),
             helper.make_node("Conv", ["x", "w2"], ["y2"]), helper.make_node("Mul", ["y2", "s"], ["out2"])]
    graph = helper.make_graph(nodes, "chains", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 8, 8]),
                               helper.make_tensor_value_info("out2", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [numpy_helper.from_array(v, k) for k, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    return model, {"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32) * 3}


def _float_outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})


@pytest.mark.parametrize("name", [n for n in _builtins() if registry().get(n).keeps_function])
def test_passes_that_claim_to_keep_the_function_do(name):
    """A pass declaring ``keeps_function`` (calibration after it then stands in for validation's float runs)
    leaves onnxruntime's outputs equal up to float rounding on every fixture model, and rewrites at least one."""
    changed = 0
    cases = [(m, onnx.load(str(MODELS / f"{m}.onnx")), {k: v[0] for k, v in np.load(MODELS / f"{m}.npz").items()})
             for m in FUNCTION_MODELS]
    for model, proto, feeds in [*cases, ("exporter chains", *_exporter_chains())]:
        graph, meta = ir.import_graph(proto)
        ctx = CompileContext(graph=graph, meta=meta, plan=Plan.default(), target=get_target("ort"))
        if name == "resolve-plan":
            PassManager(build_pipeline(",".join(PREFIX[:PREFIX.index("resolve-plan")]))).run(ctx)
        before = _float_outputs(ir.export_model(ctx.graph, ctx.meta), feeds)
        rec = PassManager(build_pipeline(name)).run(ctx)[-1]
        changed += bool(rec.modified)
        after = _float_outputs(ir.export_model(ctx.graph, ctx.meta), feeds)
        for b, a in zip(before, after, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max() + 1e-6), err_msg=(name, model))
    assert changed or name == "resolve-plan", f"{name} rewrote no fixture: the claim is untested"


def test_keeps_float_function_reads_the_passes_declarations():
    class _Plugin(Pass):
        name = "my-fold"
        keeps_function = True

        def run(self, ctx: CompileContext) -> PassResult:
            return PassResult()

    default = build_pipeline("cleanup,fold-batchnorm,fuse-activations,resolve-plan,calibrate,insert-qdq,lower")
    assert keeps_float_function(default, "calibrate")
    assert keeps_float_function([_Plugin(), *default], "calibrate")  # a plugin that declares it qualifies
    assert not keeps_float_function(build_pipeline("cleanup,resolve-plan,equalize,calibrate"), "calibrate")
    assert not keeps_float_function([_Make(), *default], "calibrate")  # undeclared: not assumed
    assert not keeps_float_function(build_pipeline("cleanup,insert-qdq"), "calibrate")
    assert Sequential([_Plugin(), registry().get("cleanup")()]).keeps_function
    assert not Sequential([_Plugin(), _Make()]).keeps_function and not Sequential([]).keeps_function
