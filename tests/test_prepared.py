"""The prepared graph (qcompiler/core/prepared.py): a measured compile imports and prepares its model once.

Oracles: the same compile with the cache off (``$QCOMPILER_PREPARED_CACHE_MB=0``), byte for byte; the kept graph
itself, which no change to a served copy may reach; the pass manager's property bookkeeping of a run that ran
every pass.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from _graphs import Builder, vi

from qcompiler import ir
from qcompiler.api import CompileOptions, compile_model
from qcompiler.core import prepared, tags
from qcompiler.core.context import CompileContext
from qcompiler.core.pass_base import GraphPass, Pass, PassResult
from qcompiler.core.pass_manager import PassManager
from qcompiler.core.registry import get_target, registry
from qcompiler.plan import Plan
from qcompiler.session import Session

MODELS = Path(__file__).resolve().parent.parent / "models"
PREFIX = ("cleanup", "fold-batchnorm", "fold-scale", "fold-bias", "fuse-activations")


def _compile(src: Path, out: Path, calib: Path, plan: str | None, cache_mb: str,
             monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(prepared.CACHE_ENV, cache_mb)
    return compile_model(src, out, CompileOptions(plan=plan, calib=str(calib), validate=False))


@pytest.mark.parametrize("fixture, plan", [("conv_bn_relu", None), ("conv_bn_relu", "w8a8-cle"), ("depthwise", "w8a8"),
                                           ("transformer_block", None), ("fp16_conv", None), ("fp16_conv", "w4a8")])
def test_measured_compiles_write_the_same_files_with_the_model_prepared_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fixture: str, plan: str | None) -> None:
    src, calib = MODELS / f"{fixture}.onnx", MODELS / f"{fixture}.npz"
    before = src.read_bytes()
    off = _compile(src, tmp_path / "off" / "m.onnx", calib, plan, "0", monkeypatch)
    on = _compile(src, tmp_path / "on" / "m.onnx", calib, plan, "512", monkeypatch)
    assert "recipe" in on.report  # the measured default / the guard: several compiles of the model
    for a, b in zip(sorted(off.files), sorted(on.files), strict=True):
        assert a.name == b.name
        if a.suffix in (".onnx", ".yaml"):
            assert a.read_bytes() == b.read_bytes(), a.name
    assert src.read_bytes() == before
    # the final compile came after the candidates: its leading graph-only passes were served, not run
    served = [r for r in on.records if r.cached]
    assert served and all(r.name in PREFIX for r in served)
    assert [r.name for r in served] == [r.name for r in off.records[:len(served)]]
    assert [(r.modified, r.stats) for r in served] == [(r.modified, r.stats) for r in off.records[:len(served)]]
    assert not any(r.cached for r in off.records)
    assert all(r.seconds == 0.0 for r in served)
    assert any(p.get("cached") for p in on.report["passes"]) and not any(p.get("cached") for p in off.report["passes"])


def test_a_budget_compile_writes_the_same_files_with_its_probes_served(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    src, calib = MODELS / "transformer_block.onnx", MODELS / "transformer_block.npz"
    got = []
    for cache_mb in ("0", "64"):
        monkeypatch.setenv(prepared.CACHE_ENV, cache_mb)
        out = tmp_path / cache_mb / "m.onnx"
        res = compile_model(src, out, CompileOptions(plan="w4a8", budget=40000, calib=str(calib), validate=False))
        assert "autoplan" in res.report
        got.append((out.read_bytes(), out.with_name("m.autoplan.yaml").read_bytes(), any(r.cached for r in res.records)))
    assert got[0][:2] == got[1][:2] and not got[0][2] and got[1][2]


def test_a_model_beyond_the_cap_is_imported_by_every_compile(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    res = _compile(MODELS / "conv_bn_relu.onnx", tmp_path / "m.onnx", MODELS / "conv_bn_relu.npz", None, "0.001",
                   monkeypatch)  # 1 KiB: less than the model file
    assert "recipe" in res.report and not any(r.cached for r in res.records)


def test_a_single_compile_keeps_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []

    def spy(g: gs.Graph) -> gs.Graph:
        calls.append(g)
        return g

    monkeypatch.setattr(prepared, "copy_graph", spy)
    res = compile_model(MODELS / "conv_bn_relu.onnx", tmp_path / "m.onnx",
                        CompileOptions(plan="default", calib=str(MODELS / "conv_bn_relu.npz"), validate=False))
    assert not calls and not any(r.cached for r in res.records)


def test_an_edited_file_at_the_same_path_is_imported_again(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    b = Builder(1)
    b.node("MatMul", ["x", b.init("w", b.randn(8, 4))], ["y"], name="mm")
    onnx.save(b.model([vi("x", [2, 8])], [vi("y", [2, 4])]), src)
    passes = [registry().get("cleanup")()]
    with prepared.sharing():
        prepared.expect_reuse()
        first = Session.load(src, Plan.default(), get_target("ort"))
        first.import_graph(upgrade=True, prepare=passes)
        first.run_passes(PassManager(passes), first.context())
        again = Session.load(src, Plan.default(), get_target("ort"))
        again.import_graph(upgrade=True, prepare=passes)
        assert again.served is not None
        b2 = Builder(2)
        b2.node("MatMul", ["x", b2.init("w", b2.randn(8, 4))], ["y"], name="mm")
        onnx.save(b2.model([vi("x", [2, 8])], [vi("y", [2, 4])]), src)
        edited = Session.load(src, Plan.default(), get_target("ort"))
        g = edited.import_graph(upgrade=True, prepare=passes)
        assert edited.served is None
        w = next(t for t in g.tensors().values() if isinstance(t, gs.Constant))
        assert np.array_equal(np.asarray(w.values), onnx.numpy_helper.to_array(
            onnx.load(src).graph.initializer[0]))


# ------------------------------------------------------------------------------------------------ copies
def _graph() -> gs.Graph:
    x = gs.Variable("x", np.float32, [1, 4])
    w = gs.Constant("w", np.arange(16, dtype=np.float32).reshape(4, 4))
    y = gs.Variable("y", np.float32, [1, 4])
    z = gs.Variable("z", np.float32, [1, 4])
    mm = gs.Node("MatMul", "mm", inputs=[x, w], outputs=[y])
    cl = gs.Node("Clip", "clip", attrs={"pads": [0, 1]}, inputs=[y], outputs=[z])
    tags.tag(cl, "fuse-activations")
    tags.mark_rescaled(y, "smooth")
    return gs.Graph(nodes=[mm, cl], inputs=[x], outputs=[z], opset=13,
                    import_domains=[onnx.helper.make_opsetid("", 13)])


def test_a_copy_shares_nothing_a_pass_may_change_in_place() -> None:
    g = _graph()
    c = prepared.copy_graph(g)
    assert [n.name for n in c.nodes] == ["mm", "clip"]
    assert tags.tag_of(c.nodes[1]) == "fuse-activations" and tags.rescaled_by(c.tensors()["y"]) == "smooth"
    # in-place changes to the copy: constant values, a shape, an attribute list, the import domains
    ct = c.tensors()
    ct["w"].values[0, 0] = 99.0
    ct["y"].shape.append(7)
    c.nodes[1].attrs["pads"].append(5)
    c.import_domains.append(onnx.helper.make_opsetid("com.microsoft", 1))
    gt = g.tensors()
    assert gt["w"].values[0, 0] == 0.0 and gt["y"].shape == [1, 4] and g.nodes[1].attrs["pads"] == [0, 1]
    assert [d.domain for d in g.import_domains] == [""]


def test_graph_only_prefix_stops_at_the_first_other_pass() -> None:
    reg = registry()
    names = ["cleanup", "fold-batchnorm", "fuse-activations", "resolve-plan", "cleanup"]
    assert prepared.prefix_length([reg.get(n)() for n in names]) == 3
    assert prepared.prefix_length([reg.get("resolve-plan")(), reg.get("cleanup")()]) == 0


# ------------------------------------------------------------------------------------------------ the manager
class _Made(GraphPass):
    name = "test-made"
    graph_only = True
    produces = frozenset({"made"})

    def run_graph(self, graph: gs.Graph) -> PassResult:
        return PassResult(True, Counter(made=1))


class _Plain(GraphPass):
    name = "test-plain"

    def run_graph(self, graph: gs.Graph) -> PassResult:
        return PassResult(False, Counter())


class _Needs(Pass):
    name = "test-needs"
    requires = frozenset({"made"})

    def run(self, ctx: CompileContext) -> PassResult:
        return PassResult(False, Counter())


def _ctx() -> CompileContext:
    return CompileContext(graph=_graph(), meta=ir.ModelMeta(ir_version=8, opset=13), plan=Plan.default(),
                          target=get_target("ort"))


def test_served_passes_are_not_run_but_their_properties_hold() -> None:
    full = PassManager([_Made(), _Needs()]).run(_ctx())
    kept: list[list] = []
    PassManager([_Made(), _Needs()]).run(_ctx(), after=(1, kept.append))
    assert [r.name for r in kept[0]] == ["test-made"]
    ctx = _ctx()
    got = PassManager([_Made(), _Needs()]).run(ctx, served=full[:1])
    assert got[0].cached and got[0].stats == {"made": 1} and not got[1].cached
    assert "made" in ctx.properties
    with pytest.raises(ValueError, match="served record"):
        PassManager([_Plain()]).run(_ctx(), served=full[:1])


def test_a_prefix_that_writes_other_context_fields_is_not_kept() -> None:
    ctx = _ctx()
    before = prepared.context_state(ctx)
    ctx.bn_stats["t"] = 1
    ctx.properties.add("x")
    assert prepared.changed_fields(before, ctx) == set()  # the fields a prepared prefix may set
    ctx.report["cleanup"] = {"n": 1}
    ctx.seed = 7
    assert prepared.changed_fields(before, ctx) == {"report", "seed"}


def test_a_served_compile_gets_the_batchnorm_statistics_the_fold_recorded() -> None:
    passes = [registry().get(n)() for n in ("cleanup", "fold-batchnorm")]
    got = []
    with prepared.sharing():
        prepared.expect_reuse()
        for _ in range(2):
            s = Session.load(MODELS / "conv_bn_relu.onnx", Plan.default(), get_target("ort"))
            s.import_graph(upgrade=True, prepare=passes)
            ctx = s.context()
            records = s.run_passes(PassManager(passes), ctx)
            got.append((s.served is not None, [r.cached for r in records], ctx.bn_stats, ctx.properties))
    (served0, cached0, bn0, props0), (served1, cached1, bn1, props1) = got
    assert (served0, cached0, served1, cached1) == (False, [False, False], True, [True, True])
    assert bn0 and sorted(bn0) == sorted(bn1) and props0 == props1
    for k in bn0:
        assert np.array_equal(bn0[k].mean, bn1[k].mean) and np.array_equal(bn0[k].std, bn1[k].std)
