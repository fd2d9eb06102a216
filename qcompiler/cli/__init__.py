"""The ``qcompiler`` command line (click). The CLI owns the terminal: tables, progress bars, exit codes.

Exit codes: 0 success; 1 a bug (a pass crashed: rerun with ``--debug`` for the traceback); 2 bad input (one
line naming the file / node / plan rule at fault), or a validation gate (``--min-sqnr``) that failed.
"""

from __future__ import annotations

import importlib
import json
import logging
import pkgutil
import sys
import traceback
from pathlib import Path
from typing import Any

import click

import qcompiler.cli.commands as commands_pkg
from qcompiler import __version__, ir
from qcompiler.api import CompileOptions, compile_model
from qcompiler.cli.options import check_option, min_sqnr_option, slice_axis_option, stream_option
from qcompiler.cli.terminal import Progress, collector_frozen, table
from qcompiler.core import profile
from qcompiler.core.errors import PassFailure, UserError
from qcompiler.core.registry import get_target, registry, targets
from qcompiler.plan import Plan, weight_input_indices
from qcompiler.plan.checks import Check, parse_check, parse_slice_axes, parse_streams
from qcompiler.report import cost
from qcompiler.report import validate as qv
from qcompiler.report.cost import format_bytes, format_count
from qcompiler.session import run_prefix

log = logging.getLogger("qcompiler")

EXAMPLES = """
\b
Examples:
  qcompiler compile models/conv_bn_relu.onnx -o out/model.int8.onnx --calib models/conv_bn_relu.npz
  qcompiler compile model.onnx -o q.onnx --plan default --calib calib/
  qcompiler compile model.onnx -o q.onnx --plan plan.yaml --calib calib/ --report report.json
  qcompiler compile model.onnx -o q.onnx --plan w4a16 --calib random
  qcompiler compile model.onnx -o q.onnx --calib calib/ --pipeline "cleanup,fold-batchnorm,resolve-plan,calibrate{method=percentile},insert-qdq,lower"
  qcompiler validate model.onnx q.onnx --data held_out.npz --min-sqnr 20
  qcompiler inspect model.onnx
  qcompiler plan resolve model.onnx plan.yaml
"""


class _Group(click.Group):
    """Turns qcompiler errors into one line and the right exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        debug = bool(ctx.params.get("debug"))
        try:
            return super().invoke(ctx)
        except UserError as e:
            if debug:
                traceback.print_exc()
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)
        except PassFailure as e:
            if debug:
                traceback.print_exception(e.cause)
            click.echo(f"internal error: {e} — this is a bug in pass '{e.pass_name}'; "
                       "rerun with `qcompiler --debug ...` for the traceback", err=True)
            ctx.exit(1)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted; nothing written", err=True)
            ctx.exit(130)
        except MemoryError:
            click.echo("error: out of memory", err=True)
            ctx.exit(2)
        except Exception as e:
            if debug:
                traceback.print_exc()
            click.echo(f"internal error: {type(e).__name__}: {e} — rerun with `qcompiler --debug ...` "
                       "for the traceback", err=True)
            ctx.exit(1)


@click.group(cls=_Group, epilog=EXAMPLES, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qcompiler")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logging.")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.pass_context
def cli(ctx: click.Context, debug: bool, verbose: int) -> None:
    """qcompiler: compile a float ONNX model into a quantized one, validated in onnxruntime."""
    level = logging.DEBUG if debug or verbose > 1 else (logging.INFO if verbose else logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    ctx.ensure_object(dict)


# ------------------------------------------------------------------------------------------------ compile
def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GB"


@cli.command("compile", epilog=EXAMPLES)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path), help="Output .onnx.")
@click.option("--plan", help="Precision plan: a YAML/JSON file, a preset name (qcompiler plan show), 'default' "
                             "(the plain default plan: skips the measured default) or 'auto' (the measured default, "
                             "what no plan gives with real calibration data).")
@click.option("--preset", help="A shipped plan by name: w8a8, w4a8, w4a16, fp8, w4a8-fp8, ... "
                               "(qcompiler plan show lists them; same as --plan NAME).")
@click.option("--target", default="ort", show_default=True, help="Runtime target (qcompiler targets).")
@click.option("--calib", help="Calibration data: folder of .npz feeds, one .npz with a leading sample axis, "
                              "'random' (synthetic ranges, asked for explicitly) or 'none' (BatchNorm statistics). "
                              "Required when the plan quantizes activations statically (the default plan does); "
                              "weight-only and dynamic plans need none.")
@click.option("--calib-samples", type=int, help="Use at most N calibration samples.")
@click.option("--calib-select", type=click.IntRange(min=1),
              help="Pick N representative samples (density + diversity) out of the calibration data.")
@click.option("--pipeline", help="Textual pipeline, e.g. 'cleanup,fold-batchnorm,resolve-plan,calibrate,insert-qdq,lower'.")
@click.option("--report", type=click.Path(path_type=Path), help="Write the JSON report here.")
@click.option("--validate/--no-validate", "validate", default=None,
              help="Validate against the float model (default: when real calibration data is given).")
@click.option("--validate-data", type=click.Path(path_type=Path), help="Held-back feeds (.npz) for validation.")
@min_sqnr_option("Fail (exit 2, nothing written) when an output's SQNR is below DB: its whole-tensor SQNR or the "
                 "SQNR of its worst slice along the channel / feature axis (the JSON report shows both).")
@check_option(" (repeatable); a failed check fails like --min-sqnr.")
@slice_axis_option
@click.option("--verify-each", is_flag=True, help="Run the ONNX checker + shape inference after every pass.")
@click.option("--dump-after", multiple=True, help="Save the graph after PASS (or 'all') to OUT.dump/.")
@click.option("--plugin", "plugins", multiple=True, help="Load passes from module:Class or path/to/file.py.")
@click.option("--external-data", type=int, default=None,
              help="Store tensors of at least BYTES as external data (OUT.onnx.data).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for synthetic data.")
@click.option("--strip-function-bodies", is_flag=True,
              help="Target packed: leave out the custom ops' ONNX function bodies (for a runtime with native "
                   "kernels; stock onnxruntime then cannot run the model, so it is not validated).")
@click.option("--budget", help="Plan mixed precision first (as `qcompiler plan`): the model must fit in BYTES "
                               "(4MB), a fraction of the float bytes (25%), average weight bits (4.5bits), or "
                               "BitOps with --bitops; --plan / --preset give the base plan.")
@click.option("--bitops", is_flag=True, help="With --budget: the budget counts BitOps (1.5G, or 50%).")
@click.option("--candidates", help="With --budget: precisions a layer may take (default int8,int4, less what the "
                                     "target runs on no layer).")
@click.option("--metric", default="pd", show_default=True,
              help="With --budget: the sensitivity metric (pd, hessian, act-stats, orthogonality). For the "
                   "measured default: a task metric module:function (or file.py:function) scoring (quantized "
                   "outputs, float outputs, feeds) -> higher-is-better float.")
@click.option("--optimize", type=click.Choice(["accuracy", "latency", "size"]), default="accuracy",
              show_default=True, help="What the measured default maximizes / minimizes (latency: measured on this "
                                      "machine, so pin the choice with --recipe-out).")
@click.option("--max-latency-ratio", type=float,
              help="Measured default (and the planner, with --budget): onnxruntime latency at most R times the "
                   "float model's (measured on this machine: pin the choice with --recipe-out).")
@click.option("--max-drop", type=float, help="Measured default with --metric module:function: the most the task "
                                            "metric may drop below the float model's.")
@click.option("--effort", type=click.Choice(["low", "normal", "high"]),
              help="Measured default: candidates measured (low, the default: 4, 5 with MatMul / Gemm; normal 8; "
                   "high all, weights-only included).")
@click.option("--recipe-out", type=click.Path(path_type=Path),
              help="Measured default: write the winning recipe as a plan YAML (compile --plan FILE reproduces it).")
@click.option("--compact-names", is_flag=True,
              help="Shortest names for every internal tensor and node (graph inputs / outputs kept; smaller "
                   "files for small models); the map back is written as OUT.names.json.")
@stream_option
@click.option("--freeze-input", "freeze_inputs", multiple=True, metavar="NAME=VALUE",
              help="Specialize the model for a fixed value of graph input NAME (a sample rate, a mode flag; "
                   "repeatable): branches on it fold away and the layers inside them get quantized; the input "
                   "stays declared and is ignored.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=D0,D1,...",
              help="Fix the dynamic dimensions of graph input NAME (repeatable): what follows from shapes alone "
                   "(Shape nodes, Ifs on shapes) folds away, so layers inside such branches get quantized; the "
                   "compiled model declares and accepts that shape only.")
@click.option("--profile", "show_profile", is_flag=True,
              help="Print where each second went: import, load, opset upgrade, each pass, export, cost report, "
                   "validation, ... (step, seconds, share; the JSON report always has it).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or summary.")
def compile_cmd(model: Path, output: Path, plan: str | None, preset: str | None, target: str,
                calib: str | None, calib_samples: int | None, calib_select: int | None, pipeline: str | None,
                report: Path | None, validate: bool | None,
                validate_data: Path | None, min_sqnr: float | None, verify_each: bool, dump_after: tuple[str, ...],
                plugins: tuple[str, ...], external_data: int | None, seed: int, strip_function_bodies: bool,
                budget: str | None, bitops: bool, candidates: str | None, metric: str, optimize: str,
                max_latency_ratio: float | None, max_drop: float | None, effort: str | None,
                recipe_out: Path | None,
                compact_names: bool, streams: tuple[str, ...], freeze_inputs: tuple[str, ...],
                input_shapes: tuple[str, ...], show_profile: bool, quiet: bool,
                checks: tuple[str, ...], slice_axes: tuple[str, ...]) -> None:
    """Compile MODEL into a quantized model at OUTPUT.

    With no --plan / --preset / --budget and real calibration data (at least 4 samples) the measured default
    chooses the recipe: candidate plans compiled and measured on held-back calibration samples, the most accurate
    that is never below the plain default plan kept (deterministic: no timing decides unless --optimize latency
    or --max-latency-ratio asks). --plan default compiles the plain default plan; --plan auto is the measured
    default by name."""
    if budget is None and (bitops or candidates is not None):
        raise UserError("--bitops and --candidates are options of --budget")
    task_metric = metric if ":" in metric else None
    if task_metric is None and metric not in BUDGET_METRICS:
        raise UserError(f"--metric: '{metric}' is neither a sensitivity metric ({', '.join(BUDGET_METRICS)}) nor "
                        "module:function")
    parsed = [parse_check(c) for c in checks]
    opts = CompileOptions(plan=plan, target=target, calib=calib, pipeline=pipeline, validate=validate,
                          validate_data=validate_data, min_sqnr_db=min_sqnr, verify_each=verify_each,
                          checks=list(parsed), slice_axes=parse_slice_axes(slice_axes),
                          dump_after=set(dump_after), external_data_threshold=external_data,
                          calib_samples=calib_samples, calib_select=calib_select, preset=preset, seed=seed,
                          plugins=list(plugins), report=report, strip_function_bodies=strip_function_bodies,
                          budget=budget, budget_bitops=bitops, budget_candidates=candidates,
                          budget_metric=metric if task_metric is None else "pd", compact_names=compact_names,
                          optimize=optimize, max_latency_ratio=max_latency_ratio, task_metric=task_metric,
                          max_drop=max_drop, effort=effort, recipe_out=recipe_out,
                          freeze_inputs=tuple(freeze_inputs), input_shapes=tuple(input_shapes),
                          stream=parse_streams(streams))
    progress = Progress(enabled=not quiet and sys.stderr.isatty())
    try:
        with collector_frozen():
            result = compile_model(model, output, opts, progress=progress)
    finally:
        progress.close()
    prof = result.profile
    if prof is not None:
        prof.finish()
    if show_profile and prof is not None:
        click.echo(prof.table())
    if quiet:
        return
    rep = result.report
    click.echo(f"compiled {model} -> {output}  (target {rep['target']}, opset {rep['opset']}, {rep['seconds']} s)")
    if prof is not None:
        click.echo("time: " + ", ".join(f"{name} {sec:.2f} s ({share * 100:.0f}%)" for name, sec, share in prof.top(3))
                   + ("" if show_profile else "  (--profile: every step)"))
    if "specialized" in rep:  # --budget with --freeze-input / --input-shape: specialized first (qcompiler.api)
        click.echo(f"specialized first (a float model, then planned under --budget): {rep['specialized']['pipeline']}")
    click.echo(f"pipeline: {result.pipeline}")
    rows = [(r.name, "yes" if r.modified else "no", "cached" if r.cached else f"{r.seconds * 1000:.1f}",
             ", ".join(f"{k}={v}" for k, v in sorted(r.stats.items()) if v)) for r in result.records]
    click.echo(table(["pass", "modified", "ms", "statistics"], rows))
    sizes = rep["sizes"]
    click.echo(f"parameters: {_bytes(sizes['float_parameter_bytes'])} float -> "
               f"{_bytes(sizes['quantized_parameter_bytes'])} ({sizes['ratio']}x)")
    if rep.get("cost"):
        _echo_cost(rep["cost"])
    if rep.get("autoplan"):
        ap = rep["autoplan"]
        click.echo(f"auto plan: budget {ap['budget']} ({ap['unit']}), metric {ap['metric']}: "
                   + ", ".join(f"{k} x{v}" for k, v in ap["counts"].items() if v)
                   + f" (plan written beside the model as {Path(output).stem}.autoplan.yaml)")
    if rep.get("recipe"):
        _echo_recipe(rep["recipe"])
    cal = rep.get("calibration")
    if cal and cal.get("source") is None and cal.get("dynamic"):
        click.echo(f"calibration: none needed — {cal['dynamic']} activation tensor(s) quantized at run time "
                   "(DynamicQuantizeLinear)")
    elif cal:
        note = "  [SYNTHETIC ranges: give --calib DATA for real ones]" if cal.get("synthetic") else ""
        click.echo(f"calibration: {cal.get('source')} — {cal.get('samples')} samples, "
                   f"{cal.get('tensors')} tensors{note}")
        if cal.get("random_shapes"):
            click.echo("calibration: random inputs of shape " + ", ".join(
                f"{k} [{', '.join(str(d) for d in v)}]" for k, v in cal["random_shapes"].items())
                + " (standard normal values; dynamic dims: batch 1, H / W / sequence 32)")
        auto = cal.get("auto")
        if auto and auto.get("output_sqnr_db"):
            click.echo(f"calibration auto: {auto['method']} (output SQNR on {auto['samples']} samples: "
                       + ", ".join(f"{m} {v:.2f} dB" for m, v in auto["output_sqnr_db"].items()) + ")")
    if result.validation is not None:
        click.echo(result.validation.table())
    elif rep.get("validation_skipped"):
        click.echo(f"validation: skipped ({rep['validation_skipped']})")
    elif validate is False:
        click.echo("validation: skipped (--no-validate)")
    else:
        click.echo("validation: skipped (no calibration data; use --calib DATA or --validate-data FILE.npz)")
    for f in result.files:
        click.echo(f"wrote {f}")


BUDGET_METRICS = ("pd", "hessian", "act-stats", "orthogonality")


def _echo_recipe(r: dict[str, Any]) -> None:
    """The measured default's candidate table (or the guard's measurements) of the compile summary."""
    # a candidate that was not compiled or not measured (its error says why) has no SQNR or bytes to show
    rows = [(m["name"], "-" if m.get("error") and m["sqnr_db"] == "-inf" else m["sqnr_db"],
             "" if m["latency_ratio"] == "inf" else f"{m['latency_ratio']:.2f}x",
             "-" if m.get("error") and not m["bytes"] else m["bytes"],
             "" if m.get("metric") is None else f"{m['metric']:.4g}",
             f"{m.get('seconds', 0.0):.1f}",  # its compile(s) and measurement: a GPTQ candidate's ceiling included
             m.get("error") or "; ".join(m.get("notes", [])) or ("WINNER" if m["name"] == r["winner"] else ""))
            for m in r["candidates"]]
    head = "measured default" if r["mode"] == "auto" else "algorithm guard"
    if r["mode"] == "auto":
        won = next((m for m in r["candidates"] if m["name"] == r["winner"]), None)
        base = r["candidates"][0] if r["candidates"] else None
        sqnr = "" if won is None or base is None else (
            f", held-back SQNR {_db(won['sqnr_db'])} dB vs {_db(base['sqnr_db'])} dB for the plain default plan")
        click.echo(f"{head}: '{r['winner']}' chosen{sqnr} ({len(r['candidates'])} candidate(s) on "
                   f"{r['held_samples']} held-back sample(s); --plan default skips it)")
    else:
        click.echo(f"{head}: {len(r['candidates'])} candidate(s) on {r['held_samples']} held-back sample(s)")
    if rows:
        click.echo(table(["candidate", "SQNR dB", "latency", "bytes", "metric", "s", "note"], rows))
    click.echo(f"{head}: {r['winner']} — {r['reason']}")
    for note in r.get("notes", []):
        click.echo(f"{head}: {note}")
    if r.get("dropped"):
        click.echo(f"{head}: dropped {', '.join(r['dropped'])} (measured worse than without)")


def _db(x: Any) -> str:
    return f"{x:.2f}" if isinstance(x, (int, float)) else str(x)


def _echo_cost(c: dict[str, Any]) -> None:
    """The cost lines of the compile summary (the JSON report has every layer)."""
    peak = c.get("peak_activation_bytes")
    avg = c.get("average_weight_bits")
    click.echo(f"cost: {c['total_bytes']} bytes stored ({format_bytes(c['total_bytes'])}: tensors "
               f"{format_bytes(c['tensor_bytes'])} + graph {format_bytes(c['overhead_bytes'])}), "
               f"{format_count(c['macs'])} MACs, {format_count(c['bitops'])} BitOps, "
               + (f"avg weight bits {avg:.2f}, " if avg is not None else "")
               + ("peak activations unknown" if peak is None else f"peak activations {format_bytes(peak)}")
               + " (batch 1)")
    rows = sorted((la for la in c.get("layers", []) if la.get("bytes") or la.get("macs")),
                  key=lambda la: -la["bytes"])[:5]
    if rows:
        click.echo("largest layers: " + ", ".join(f"{la['name']} {format_bytes(la['bytes'])}"
                                                  + (f" ({la['weight_format']})" if la.get("weight_format") else "")
                                                  for la in rows))


# ----------------------------------------------------------------------------------------------- validate
@cli.command("validate")
@click.argument("float_model", type=click.Path(path_type=Path))
@click.argument("quant_model", type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="Feeds: .npz with a leading sample axis, or a folder of .npz files.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the report as JSON.")
@min_sqnr_option("Exit 2 when a graph output's SQNR is below DB: its whole-tensor SQNR or that of its worst slice "
                 "along the channel / feature axis.")
@check_option(" (repeatable); exit 2 when one fails.")
@slice_axis_option
@stream_option
@click.option("--layers/--no-layers", default=True, show_default=True, help="Per-layer comparison.")
@click.option("--max-layers", type=int, default=15, show_default=True, help="Worst layers to print.")
@click.option("--names", "names_path", type=click.Path(path_type=Path),
              help="The OUT.names.json of a --compact-names compile (default: the one beside QUANT_MODEL, if any): "
                   "layers are compared by their original names.")
def validate_cmd(float_model: Path, quant_model: Path, data: Path, json_path: Path | None, min_sqnr: float | None,
                 checks: tuple[str, ...], slice_axes: tuple[str, ...], streams: tuple[str, ...], layers: bool,
                 max_layers: int, names_path: Path | None) -> None:
    """Compare QUANT_MODEL with FLOAT_MODEL in onnxruntime: SQNR, cosine, max error, top-1, per layer.

    Each layer is shown with its node, op type and, when the compile's QUANT_MODEL.plan.yaml is beside
    QUANT_MODEL, the plan rule that decided it."""
    parsed = [parse_check(c) for c in checks]
    axes = parse_slice_axes(slice_axes)
    stream = parse_streams(streams)
    explicit = names_path is not None
    if names_path is None:
        beside = quant_model.with_name(quant_model.stem + ".names.json")
        names_path = beside if beside.is_file() else None
    outs = ir.OutputSet()  # --json may not be (or alias) an input; checked before anything is loaded
    outs.add_input(float_model, "float model", model=True)
    outs.add_input(quant_model, "quantized model", model=True)
    outs.add_input(data, "validation data")
    outs.add_input(names_path, "names file")
    if json_path is not None:
        outs.add_output(json_path, "--json", primary=True)
    with outs:
        report = _validate(float_model, quant_model, data, names_path, explicit, layers, min_sqnr, parsed, axes,
                           stream)
        click.echo(report.table(max_layers=max_layers))
        if json_path is not None:
            outs.path(json_path).write_text(json.dumps(report.to_json(), indent=2, sort_keys=True) + "\n",
                                            encoding="utf-8")
            outs.commit()
    if report.gated and not report.passed:
        click.echo(f"error: {report.failure()}", err=True)
        sys.exit(2)


def _validate(float_model: Path, quant_model: Path, data: Path, names_path: Path | None, explicit: bool,
              layers: bool, min_sqnr: float | None, checks: list[Check], slice_axes: dict[str, int],
              stream: dict[str, str]) -> Any:
    fm = ir.load_model(float_model)
    qm = ir.load_model(quant_model)
    names = qv.load_names(names_path) if names_path is not None else None
    if names is not None:
        unknown = set(names) - ir.tensor_names(qm)
        if unknown and explicit:
            raise UserError(f"{names_path}: names {', '.join(sorted(unknown)[:3])} are not tensors of {quant_model} "
                            "(a names file of another compile?)")
        if unknown:
            log.warning("%s: not the names of %s (a leftover of another compile?); ignored", names_path, quant_model)
            names = None
    feeds = qv.load_feeds(data, fm)
    report = qv.validate(fm, qm, feeds, per_layer=layers, min_sqnr_db=min_sqnr, names=names, checks=checks,
                         slice_axes=slice_axes or None, stream=stream or None)
    plan_file = quant_model.with_name(quant_model.stem + ".plan.yaml")  # the compile's resolved plan, if beside
    plan_nodes = qv.load_plan_nodes(plan_file) if plan_file.is_file() else None
    if plan_nodes is not None:
        report.attach_plan(plan_nodes, qv.load_node_names(names_path) if names is not None and names_path else None)
    return report


# ------------------------------------------------------------------------------------------------ inspect
@cli.command("inspect")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.option("--cost", "with_cost", is_flag=True,
              help="Cost report: stored bytes per layer and in total, MACs, BitOps, peak activation memory (batch 1).")
@click.option("--shape", "shapes", multiple=True, metavar="NAME=D0,D1,...",
              help="With --cost: the shape of input NAME (resolves its dynamic dims; others are 1).")
def inspect_cmd(model: Path, as_json: bool, with_cost: bool, shapes: tuple[str, ...]) -> None:
    """Opset, inputs/outputs, op histogram, parameter bytes and quantizable nodes of MODEL."""
    if with_cost:
        rep = cost.model_cost(model, feed_shapes=cost.parse_shapes(shapes))
        if as_json:
            click.echo(json.dumps(rep.to_json(), indent=2))
        else:
            click.echo(f"{model}: cost (bytes as stored; MACs / BitOps / activations at batch 1)")
            click.echo(rep.table())
        return
    if shapes:
        raise UserError("--shape is only used with --cost")
    m = ir.load_model(model)
    info = ir.model_summary(m)
    del m
    # The graph the compile resolves its plan on (target ort's pipeline up to resolve-plan: Constant-node
    # weights are initializers by then, BatchNorms folded), so the nodes and names are the compile's.
    ctx = run_prefix(model, Plan.default(), get_target("ort"))
    assert ctx.resolved is not None
    quantizable = [n.node for n in ctx.resolved.nodes.values() if n.quantized]
    weight_ops = sum(1 for n in ctx.graph.nodes if weight_input_indices(n))  # ops with a constant weight
    info["quantizable_nodes"] = quantizable
    info["weight_ops"] = weight_ops
    info["quantizable_note"] = "with the default plan and target ort, on the graph the compile quantizes"
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{model}: ir_version {info['ir_version']}, opset "
               + ", ".join(f"{k} {v}" for k, v in info["opset"].items()) + f", producer '{info['producer']}'")
    click.echo(table(["input", "dtype", "shape"], [(i["name"], i["dtype"], i["shape"]) for i in info["inputs"]]))
    click.echo(table(["output", "dtype", "shape"], [(o["name"], o["dtype"], o["shape"]) for o in info["outputs"]]))
    click.echo(f"nodes: {info['nodes']}, parameter bytes: {_bytes(info['parameter_bytes'])}")
    click.echo(table(["op", "count"], list(info["ops"].items())))
    click.echo(f"quantizable nodes ({info['quantizable_note']}): {len(quantizable)} of {weight_ops} weight ops "
               "(ops with a constant weight, Constant nodes included)")
    for name in quantizable[:50]:
        click.echo(f"  {name}")
    if len(quantizable) > 50:
        click.echo(f"  ... {len(quantizable) - 50} more")


# ------------------------------------------------------------------------------------------- passes/targets
@cli.command("passes")
def passes_cmd() -> None:
    """List the registered passes with one-line docs."""
    reg = registry()
    rows = [(name, reg.origin[name], cls.summary()) for name, cls in sorted(reg.passes.items())]
    click.echo(table(["pass", "from", "description"], rows))


@cli.command("targets")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def targets_cmd(as_json: bool) -> None:
    """List runtime targets and what each supports."""
    data = {name: {"description": cls.description, "default_pipeline": cls.default_pipeline,
                   "plan_options": {k: {"default": d, "doc": doc} for k, (d, doc) in cls.options.items()},
                   **cls().capabilities()} for name, cls in sorted(targets().items())}
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for name, d in data.items():
        click.echo(f"{name}: {d['description']}")
        click.echo(f"  default pipeline: {d['default_pipeline']}")
        for opt, info in d["plan_options"].items():
            click.echo(f"  plan option targets.{name}.{opt} (default {json.dumps(info['default'])}): {info['doc']}")
        for op, cap in d["ops"].items():
            click.echo(f"  {op}: weights {','.join(cap['weight_dtypes'])}; activations "
                       f"{','.join(cap['activation_dtypes']) or 'none (weight-only)'}; {','.join(cap['granularities'])}; "
                       f"schemes {','.join(cap['schemes'])}")
        if d.get("dynamic_activation_ops"):
            click.echo(f"  activations quantized at run time (calibration dynamic): "
                       f"{','.join(d['dynamic_activation_ops'])}")
        custom = d.get("custom_ops")
        if custom:
            click.echo(f"  custom ops (domain {custom['domain']} v{custom['version']}, opset >= {custom['min_opset']}):")
            for op, info in custom["ops"].items():
                click.echo(f"    {op}: {info['scheme']} {info['replaces']}, {info['bits_per_weight']} bit(s)/weight")


def _register_extra_commands() -> None:
    """Commands living in ``qcompiler/cli/commands/*.py``: each module defines ``register(cli)``."""
    for info in sorted(pkgutil.iter_modules(commands_pkg.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{commands_pkg.__name__}.{info.name}").register(cli)


_register_extra_commands()
profile.mark_imported()  # the `import` step of `compile --profile` ends here


def main() -> None:
    cli(obj={})


if __name__ == "__main__":  # pragma: no cover
    main()
