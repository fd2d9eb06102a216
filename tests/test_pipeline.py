"""Pipeline text, the pass manager and the registry: parsing (options, coercion, errors), the requirement check
before anything runs, ``verify_each``, ``dump_after``, per-pass timing and statistics, entry points, ``--plugin``
loading, name clashes, and the canonical pipeline text round trip.
"""

from __future__ import annotations

import logging
import textwrap
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from qcompiler import ir
from qcompiler.api import CompileOptions, compile_model
from qcompiler.core import registry as registry_mod
from qcompiler.core.context import CompileContext
from qcompiler.core.errors import PassFailure, UserError
from qcompiler.core.pass_base import Pass, PassResult
from qcompiler.core.pass_manager import PassManager
from qcompiler.core.registry import Registry, build_pipeline, parse_pipeline_text, registry
from qcompiler.passes.calibrate import CalibratePass
from qcompiler.passes.cleanup import CleanupPass
from qcompiler.plan import Plan
from qcompiler.runtime_targets import DEFAULT_PIPELINE, get_target

MODELS = Path(__file__).resolve().parent.parent / "models"


# ------------------------------------------------------------------------------------------- test passes
@dataclass
class KnobOptions:
    flag: bool = False
    names: tuple[str, ...] = ()
    count: int = 1
    ratio: float | None = None
    label: str = "x"


class KnobPass(Pass):
    """Records its options (a pass with every kind of option type)."""

    name = "knob"
    Options = KnobOptions

    def run(self, ctx: CompileContext) -> PassResult:
        return PassResult(False, Counter(count=self.options.count))


class CorruptPass(Pass):
    """Adds a node of an op that does not exist (the ONNX checker rejects the graph)."""

    name = "corrupt"

    def run(self, ctx: CompileContext) -> PassResult:
        x = ctx.graph.inputs[0]
        out = gs.Variable("corrupt_out", dtype=np.float32, shape=x.shape)
        ctx.graph.nodes.append(self.tag(gs.Node("NoSuchOp", "corrupt", inputs=[x], outputs=[out])))
        ctx.graph.outputs.append(out)
        return PassResult(True, Counter(added=1))


def _ctx(name: str = "conv_bn_relu") -> CompileContext:
    graph, meta = ir.import_graph(onnx.load(str(MODELS / f"{name}.onnx")))
    return CompileContext(graph=graph, meta=meta, plan=Plan.default(), target=get_target("ort"))


# --------------------------------------------------------------------------------------------- parsing
def test_parse_pipeline_text_with_options():
    items = parse_pipeline_text(" cleanup{fold-shapes=true} , fold-batchnorm,calibrate{method=percentile,"
                                "percentile=99.9},insert-qdq,lower")
    assert items == [("cleanup", {"fold-shapes": "true"}), ("fold-batchnorm", {}),
                     ("calibrate", {"method": "percentile", "percentile": "99.9"}), ("insert-qdq", {}),
                     ("lower", {})]
    passes = build_pipeline("cleanup{fold-shapes=true,fold_limit_mib=8},calibrate{method=percentile,"
                            "percentile=99.9,samples=4}")
    assert passes[0].options.fold_shapes is True and passes[0].options.fold_limit_mib == 8
    assert passes[1].options.method == "percentile"
    assert passes[1].options.percentile == 99.9 and passes[1].options.samples == 4


@pytest.mark.parametrize("text, message", [
    ("", "pipeline: empty pipeline"),
    ("cleanup,fold-bn", "pipeline: unknown pass 'fold-bn' (did you mean fold-batchnorm"),
    ("cleanup,frobnicate", "pipeline: unknown pass 'frobnicate'; `qcompiler passes` lists them"),
    ("calibrate{bogus=1}", "pass 'calibrate': unknown option 'bogus' (known: auto_samples, method, percentile, "),
    ("calibrate{samples=abc}", "pass 'calibrate' option 'samples': expected int, got 'abc'"),
    ("calibrate{method=median}", "pass 'calibrate' option 'method': bad value 'median' (one of: minmax, "),
    ("calibrate{percentile=40}", "pass 'calibrate' option 'percentile': must be in (50, 100], got 40.0"),
    ("cleanup{fold-constants=maybe}", "pass 'cleanup' option 'fold-constants': expected true/false, got 'maybe'"),
    ("calibrate{method}", "pipeline: option 'method' of pass 'calibrate' is not key=value"),
    ("calibrate{method=minmax", "pipeline: unbalanced '{' in 'calibrate{method=minmax'"),
    ("calibrate}method=minmax{", "pipeline: unbalanced '}' in 'calibrate}method=minmax{'"),
    ("cleanup,,lower", "pipeline: cannot parse '' (expected name or name{key=value,...})"),
    ("clean up", "pipeline: cannot parse 'clean up' (expected name or name{key=value,...})"),
])
def test_pipeline_text_errors(text, message):
    with pytest.raises(UserError) as e:
        build_pipeline(text)
    assert str(e.value).startswith(message), (str(e.value), message)
    assert "\n" not in str(e.value)


def test_option_coercion_and_canonical_round_trip():
    reg = Registry()
    reg.add(KnobPass, "test")
    reg.add(CalibratePass, "built-in")
    p = build_pipeline("knob{flag=yes,names=a;b;c,count=3,ratio=0.5,label=hello}", reg)[0]
    assert p.options == KnobOptions(flag=True, names=("a", "b", "c"), count=3, ratio=0.5, label="hello")
    assert p.canonical() == "knob{flag=true,names=a;b;c,count=3,ratio=0.5,label=hello}"
    assert build_pipeline("knob{ratio=none}", reg)[0].options.ratio is None
    # defaults are left out; the canonical text parses back to equal options and the same text
    text = "calibrate{percentile=99.9,method=percentile},knob{count=1,flag=false},knob{names=z}"
    passes = build_pipeline(text, reg)
    canon = PassManager(passes).pipeline_text()
    assert canon == "calibrate{method=percentile,percentile=99.9},knob,knob{names=z}"
    again = build_pipeline(canon, reg)
    assert [q.options for q in again] == [q.options for q in passes]
    assert PassManager(again).pipeline_text() == canon
    assert PassManager(build_pipeline(DEFAULT_PIPELINE)).pipeline_text() == DEFAULT_PIPELINE


def test_pass_constructor_rejects_unknown_keyword():
    with pytest.raises(UserError, match=r"pass 'knob': bad options: .*unexpected keyword argument 'colour'"):
        KnobPass(colour="red")


# ----------------------------------------------------------------------------------- requirement check
def test_requirements_checked_before_anything_runs(tmp_path, monkeypatch):
    with pytest.raises(UserError) as e:
        PassManager(build_pipeline("insert-qdq")).check({"model"})
    assert str(e.value) == ("pipeline: pass #1 'insert-qdq' requires 'calibrated', which no earlier pass produces "
                            "(run calibrate before it)")
    ran: list[str] = []
    monkeypatch.setattr(CleanupPass, "run", lambda self, ctx: ran.append("cleanup") or PassResult())
    ctx = _ctx()
    with pytest.raises(UserError, match=r"pass #3 'calibrate' requires 'plan-resolved'.*\(run resolve-plan before it\)"):
        PassManager(build_pipeline("cleanup,fold-batchnorm,calibrate,insert-qdq")).run(ctx)
    assert ran == [] and ctx.properties == {"model"}
    # through the driver: nothing runs, nothing is written
    out = tmp_path / "q.onnx"
    with pytest.raises(UserError, match="pass #2 'insert-qdq' requires"):
        compile_model(MODELS / "conv_bn_relu.onnx", out, CompileOptions(pipeline="cleanup,insert-qdq"))
    assert ran == [] and list(tmp_path.iterdir()) == []
    # the order matters, not just the set
    PassManager(build_pipeline("resolve-plan,calibrate,insert-qdq,lower")).check({"model"})
    with pytest.raises(UserError, match="pass #1 'lower' requires 'qdq'"):
        PassManager(build_pipeline("lower,resolve-plan,calibrate,insert-qdq")).check({"model"})


# ---------------------------------------------------------------------------------- run: timing, verify
def test_records_have_timing_and_statistics():
    ctx = _ctx()
    records = PassManager(build_pipeline("cleanup,fold-batchnorm,cleanup,resolve-plan")).run(ctx)
    assert [r.name for r in records] == ["cleanup", "fold-batchnorm", "cleanup", "resolve-plan"]
    assert all(r.seconds > 0 for r in records)
    fold = records[1]
    assert fold.modified is True and fold.stats["folded_conv"] == 5
    assert records[2].modified is False  # cleanup after folding has nothing left to do
    assert records[3].to_json()["stats"]["quantized_nodes"] == 6
    assert ctx.properties >= {"model", "clean", "bn-folded", "plan-resolved"}


def test_verify_each_catches_the_pass_that_broke_the_graph():
    reg = Registry()
    for cls in (CleanupPass, CorruptPass, KnobPass):
        reg.add(cls, "test")
    # without verification the broken graph flows on unnoticed
    records = PassManager(build_pipeline("cleanup,corrupt,knob", reg)).run(_ctx())
    assert [r.name for r in records] == ["cleanup", "corrupt", "knob"]
    with pytest.raises(PassFailure) as e:
        PassManager(build_pipeline("cleanup,corrupt,knob", reg), verify_each=True).run(_ctx())
    assert e.value.pass_name == "corrupt"
    assert "after pass 'corrupt': fails the ONNX checker" in str(e.value) and "NoSuchOp" in str(e.value)
    # a correct pipeline verifies cleanly (checker + strict shape inference after every pass)
    assert len(PassManager(build_pipeline("cleanup,fold-batchnorm,cleanup"), verify_each=True).run(_ctx())) == 3


def test_crashing_pass_becomes_pass_failure():
    class Boom(Pass):
        name = "boom"

        def run(self, ctx: CompileContext) -> PassResult:
            return 1 // 0  # type: ignore[return-value]

    class NotAResult(Pass):
        name = "not-a-result"

        def run(self, ctx: CompileContext) -> PassResult:
            return True  # type: ignore[return-value]

    with pytest.raises(PassFailure) as e:
        PassManager([CleanupPass(), Boom()]).run(_ctx())
    assert e.value.pass_name == "boom" and isinstance(e.value.cause, ZeroDivisionError)
    with pytest.raises(PassFailure, match="run\\(\\) returned bool, not PassResult"):
        PassManager([NotAResult()]).run(_ctx())


def test_dump_after(tmp_path):
    out = tmp_path / "q.onnx"
    compile_model(MODELS / "conv_bn_relu.onnx", out,
                  CompileOptions(calib="random", calib_samples=2, dump_after={"insert-qdq"}))
    dumps = sorted(p.name for p in (tmp_path / "q.dump").iterdir())
    assert dumps == ["09-insert-qdq.onnx"]
    d = onnx.load(str(tmp_path / "q.dump" / "09-insert-qdq.onnx"))
    onnx.checker.check_model(d, full_check=True)
    assert sum(n.op_type == "QuantizeLinear" for n in d.graph.node) == 6  # dw.conv: float activations on ort
    out2 = tmp_path / "all" / "q.onnx"
    compile_model(MODELS / "conv_bn_relu.onnx", out2, CompileOptions(calib="random", calib_samples=2,
                                                                     dump_after={"all"}))
    names = sorted(p.name for p in (tmp_path / "all" / "q.dump").iterdir())
    assert names == ["01-cleanup.onnx", "02-fold-batchnorm.onnx", "03-fold-scale.onnx", "04-fold-bias.onnx",
                     "05-fuse-activations.onnx", "06-cleanup.onnx", "07-resolve-plan.onnx", "08-calibrate.onnx",
                     "09-insert-qdq.onnx", "10-lower.onnx"]
    folded = onnx.load(str(tmp_path / "all" / "q.dump" / "02-fold-batchnorm.onnx"))
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    assert not any(n.op_type == "QuantizeLinear" for n in folded.graph.node)
    with pytest.raises(UserError, match="--dump-after: no pass named 'insert-q' in the pipeline"):
        compile_model(MODELS / "conv_bn_relu.onnx", tmp_path / "x.onnx",
                      CompileOptions(calib="random", dump_after={"insert-q"}))


# ---------------------------------------------------------------------------------------------- plugins
PLUGIN_SOURCE = textwrap.dedent('''
    """A test plugin: scale every graph output by a constant."""
    from collections import Counter
    from dataclasses import dataclass

    import numpy as np
    import onnx_graphsurgeon as gs

    from qcompiler.core.pass_base import Pass, PassResult


    @dataclass
    class Options:
        factor: float = 2.0


    class ScaleOutputsPass(Pass):
        """Multiply every graph output by FACTOR."""

        name = "{name}"
        Options = Options

        def run(self, ctx):
            stats = Counter()
            for i, out in enumerate(list(ctx.graph.outputs)):
                if any(n.name == out.name + "_scale" for n in ctx.graph.nodes):
                    continue
                inner = gs.Variable(out.name + "_unscaled", dtype=out.dtype, shape=out.shape)
                producer = out.inputs[0]
                producer.outputs[producer.outputs.index(out)] = inner
                k = gs.Constant(out.name + "_factor", np.array(self.options.factor, np.float32))
                ctx.graph.nodes.append(self.tag(gs.Node("Mul", out.name + "_scale", inputs=[inner, k],
                                                        outputs=[out])))
                stats["scaled"] += 1
            return PassResult(bool(stats), stats)


    def helper():
        return 1
''')


def _write_plugin(folder: Path, module: str, pass_name: str = "scale-outputs") -> Path:
    path = folder / f"{module}.py"
    path.write_text(PLUGIN_SOURCE.replace("{name}", pass_name))
    return path


def test_plugin_module_class_and_file(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    _write_plugin(tmp_path, "qc_test_plugin_mod")
    reg = Registry()
    assert reg.load_plugin("qc_test_plugin_mod:ScaleOutputsPass") == ["scale-outputs"]
    assert reg.origin["scale-outputs"] == "plugin qc_test_plugin_mod:ScaleOutputsPass"
    assert reg.passes["scale-outputs"].summary() == "Multiply every graph output by FACTOR."
    # loading the same module again is harmless (same class)
    assert reg.load_plugin("qc_test_plugin_mod") == ["scale-outputs"]
    # by file path, with and without the class name
    f = _write_plugin(tmp_path, "file_plugin", "scale-outputs-file")
    reg2 = Registry()
    assert reg2.load_plugin(str(f)) == ["scale-outputs-file"]
    assert reg2.load_plugin(f"{f}:ScaleOutputsPass") == ["scale-outputs-file"]
    p = build_pipeline("scale-outputs-file{factor=3}", reg2)[0]
    assert p.options.factor == 3.0 and p.canonical() == "scale-outputs-file{factor=3.0}"


def test_plugin_pass_runs_in_compile(tmp_path, monkeypatch):
    """A plugin from a file, with an option, in a textual pipeline; its effect is exact and it is tagged."""
    monkeypatch.setattr(registry_mod, "_REGISTRY", None)  # keep the plugin out of the process-wide registry
    f = _write_plugin(tmp_path, "scale_plugin", "scale-outputs-x4")
    out = tmp_path / "q.onnx"
    pipeline = "cleanup,fold-batchnorm,scale-outputs-x4{factor=4},cleanup"
    res = compile_model(MODELS / "gemm_head.onnx", out, CompileOptions(pipeline=pipeline, plugins=[str(f)]))
    assert res.pipeline == "cleanup,fold-batchnorm,scale-outputs-x4{factor=4.0},cleanup"
    assert next(r for r in res.records if r.name == "scale-outputs-x4").stats["scaled"] == 1
    x = np.load(MODELS / "gemm_head.npz")["input"][:4].reshape(4, 64)
    ref = ir.session(onnx.load(str(MODELS / "gemm_head.onnx"))).run(None, {"input": x})[0]
    q = onnx.load(str(out))
    got = ir.session(q).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, 4.0 * ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))
    mul = next(n for n in q.graph.node if n.name == "output_scale")
    assert {p.key: p.value for p in mul.metadata_props} == {ir.TAG_KEY: "scale-outputs-x4"}
    # a second compile in the same process with the same plugin file works (no self-clash)
    compile_model(MODELS / "gemm_head.onnx", tmp_path / "q2.onnx", CompileOptions(pipeline=pipeline,
                                                                                  plugins=[str(f)]))


@pytest.mark.parametrize("spec, message", [
    ("{tmp}/missing.py", "--plugin {tmp}/missing.py: no such file '{tmp}/missing.py'"),
    ("qc_no_such_module_xyz", "--plugin qc_no_such_module_xyz: cannot import module 'qc_no_such_module_xyz': "
                              "No module named 'qc_no_such_module_xyz'"),
    ("{tmp}/plug.py:Nope", "--plugin {tmp}/plug.py:Nope: module has no attribute 'Nope'"),
    ("{tmp}/plug.py:helper", "plugin {tmp}/plug.py:helper: 'helper' is not a qcompiler Pass subclass"),
    ("{tmp}/empty.py", "--plugin {tmp}/empty.py: no Pass subclass with a name found"),
    ("{tmp}/broken.py", "--plugin {tmp}/broken.py: importing failed: ZeroDivisionError: integer division or modulo by zero"),
    ("{tmp}/badname.py", "plugin {tmp}/badname.py: pass class ScaleOutputsPass needs a kebab-case 'name' "
                         "(got 'Scale_Outputs')"),
    ("{tmp}/clash.py", "plugin {tmp}/clash.py: pass name 'cleanup' is already taken by built-in"),
])
def test_plugin_errors(spec, message, tmp_path):
    _write_plugin(tmp_path, "plug")
    _write_plugin(tmp_path, "badname", "Scale_Outputs")
    _write_plugin(tmp_path, "clash", "cleanup")
    (tmp_path / "empty.py").write_text("X = 1\n")
    (tmp_path / "broken.py").write_text("X = 1 // 0\n")
    reg = Registry()
    registry_mod._load_builtins(reg)
    with pytest.raises(UserError) as e:
        reg.load_plugin(spec.format(tmp=tmp_path))
    assert str(e.value) == message.format(tmp=tmp_path)


def test_two_plugins_with_one_name_clash(tmp_path):
    a = _write_plugin(tmp_path, "first_plugin", "same-name")
    b = _write_plugin(tmp_path, "second_plugin", "same-name")
    reg = Registry()
    reg.load_plugin(str(a))
    with pytest.raises(UserError, match=f"plugin {b}: pass name 'same-name' is already taken by plugin {a}"):
        reg.load_plugin(str(b))


def test_entry_point_plugins(tmp_path, monkeypatch, caplog):
    """A distribution that declares ``[qcompiler.passes]`` entry points is picked up by the registry."""
    _write_plugin(tmp_path, "qc_ep_plugin_pkg", "ep-scale-outputs")
    dist = tmp_path / "qc_ep_plugin_pkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: qc-ep-plugin-pkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[qcompiler.passes]\n"
                                           "ep-scale-outputs = qc_ep_plugin_pkg:ScaleOutputsPass\n"
                                           "ep-broken = qc_ep_plugin_pkg:DoesNotExist\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry_mod, "_REGISTRY", None)  # a fresh process-wide registry (restored afterwards)
    with caplog.at_level(logging.WARNING, logger="qcompiler"):
        reg = registry()
    assert reg.origin["ep-scale-outputs"] == "entry point qc_ep_plugin_pkg:ScaleOutputsPass"
    assert reg.origin["fold-batchnorm"] == "built-in"
    assert "ep-broken" not in reg.passes
    assert any("entry point ep-broken (qc_ep_plugin_pkg:DoesNotExist) failed to load" in r.getMessage()
               for r in caplog.records)
    from click.testing import CliRunner

    from qcompiler.cli import cli

    res = CliRunner().invoke(cli, ["passes"])
    assert res.exit_code == 0
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("ep-scale-outputs"))
    assert "entry point qc_ep_plugin_pkg:ScaleOutputsPass" in line and "Multiply every graph output" in line


def test_builtin_registry_contents():
    reg = registry()
    for name in ("cleanup", "fold-batchnorm", "resolve-plan", "calibrate", "insert-qdq", "lower"):
        assert reg.origin[name] == "built-in"
        assert reg.passes[name].summary()
    # kebab-case names from the one-pass-per-module house rule
    assert reg.passes["fold-batchnorm"].__module__ == "qcompiler.passes.fold_batchnorm"
