"""The ``qcompiler`` command line (click). The CLI owns the terminal: tables, progress bars, exit codes.

Exit codes: 0 success; 1 a bug (a pass crashed: rerun with ``--debug`` for the traceback); 2 bad input (one
line naming the file / node / plan rule at fault), or a validation gate (``--min-sqnr``) that failed.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Any

import click

from qcompiler import __version__
from qcompiler.errors import PassFailure, UserError

log = logging.getLogger("qcompiler")

EXAMPLES = """
\b
Examples:
  qcompiler compile models/conv_bn_relu.onnx -o out/model.int8.onnx --calib models/conv_bn_relu.npz
  qcompiler compile model.onnx -o q.onnx --plan plan.yaml --calib calib/ --report report.json
  qcompiler compile model.onnx -o q.onnx --plan w4a16 --calib random
  qcompiler compile model.onnx -o q.onnx --pipeline "cleanup,fold-batchnorm,resolve-plan,calibrate{method=percentile},insert-qdq,lower"
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
class _Progress:
    """tqdm bars for calibration / validation; pass names on one line."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None
        self.stage = ""

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if stage.startswith("pass:"):
            self.close()
            return
        from tqdm import tqdm

        if stage != self.stage or self.bar is None:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=total, desc=stage, unit="sample", file=sys.stderr, leave=False)
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            self.stage = ""


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GB"


@cli.command("compile", epilog=EXAMPLES)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path), help="Output .onnx.")
@click.option("--plan", help="Precision plan: a YAML/JSON file or a preset name (qcompiler plan show).")
@click.option("--target", default="ort", show_default=True, help="Runtime target (qcompiler targets).")
@click.option("--calib", help="Calibration data: folder of .npz feeds, one .npz with a leading sample axis, "
                              "'random' (synthetic) or 'none'.")
@click.option("--calib-samples", type=int, help="Use at most N calibration samples.")
@click.option("--pipeline", help="Textual pipeline, e.g. 'cleanup,fold-batchnorm,resolve-plan,calibrate,insert-qdq,lower'.")
@click.option("--report", type=click.Path(path_type=Path), help="Write the JSON report here.")
@click.option("--validate/--no-validate", "validate", default=None,
              help="Validate against the float model (default: when real calibration data is given).")
@click.option("--validate-data", type=click.Path(path_type=Path), help="Held-back feeds (.npz) for validation.")
@click.option("--min-sqnr", type=float, help="Fail (exit 2, nothing written) when an output's SQNR is below DB.")
@click.option("--verify-each", is_flag=True, help="Run the ONNX checker + shape inference after every pass.")
@click.option("--dump-after", multiple=True, help="Save the graph after PASS (or 'all') to OUT.dump/.")
@click.option("--plugin", "plugins", multiple=True, help="Load passes from module:Class or path/to/file.py.")
@click.option("--external-data", type=int, default=None,
              help="Store tensors of at least BYTES as external data (OUT.onnx.data).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for synthetic data.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or summary.")
def compile_cmd(model: Path, output: Path, plan: str | None, target: str, calib: str | None,
                calib_samples: int | None, pipeline: str | None, report: Path | None, validate: bool | None,
                validate_data: Path | None, min_sqnr: float | None, verify_each: bool, dump_after: tuple[str, ...],
                plugins: tuple[str, ...], external_data: int | None, seed: int, quiet: bool) -> None:
    """Compile MODEL into a quantized model at OUTPUT."""
    from qcompiler.compiler import CompileOptions, compile_model

    opts = CompileOptions(plan=plan, target=target, calib=calib, pipeline=pipeline, validate=validate,
                          validate_data=validate_data, min_sqnr_db=min_sqnr, verify_each=verify_each,
                          dump_after=set(dump_after), external_data_threshold=external_data,
                          calib_samples=calib_samples, seed=seed, plugins=list(plugins), report=report)
    progress = _Progress(enabled=not quiet and sys.stderr.isatty())
    try:
        result = compile_model(model, output, opts, progress=progress)
    finally:
        progress.close()
    if quiet:
        return
    rep = result.report
    click.echo(f"compiled {model} -> {output}  (target {rep['target']}, opset {rep['opset']}, {rep['seconds']} s)")
    click.echo(f"pipeline: {result.pipeline}")
    rows = [(r.name, "yes" if r.modified else "no", f"{r.seconds * 1000:.1f}",
             ", ".join(f"{k}={v}" for k, v in sorted(r.stats.items()) if v)) for r in result.records]
    click.echo(_table(["pass", "modified", "ms", "statistics"], rows))
    sizes = rep["sizes"]
    click.echo(f"parameters: {_bytes(sizes['float_parameter_bytes'])} float -> "
               f"{_bytes(sizes['quantized_parameter_bytes'])} ({sizes['ratio']}x)")
    cal = rep.get("calibration")
    if cal:
        note = "  [SYNTHETIC ranges: give --calib DATA for real ones]" if cal.get("synthetic") else ""
        click.echo(f"calibration: {cal.get('source')} — {cal.get('samples')} samples, "
                   f"{cal.get('tensors')} tensors{note}")
    if result.validation is not None:
        click.echo(result.validation.table())
    else:
        click.echo("validation: skipped (no calibration data; use --calib DATA or --validate-data FILE.npz)")
    for f in result.files:
        click.echo(f"wrote {f}")


def _table(headers: list[str], rows: list[tuple[Any, ...]]) -> str:
    cols = [headers, *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cols) for i in range(len(headers))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cols[1:]]
    return "\n".join(line.rstrip() for line in lines)


# ----------------------------------------------------------------------------------------------- validate
@cli.command("validate")
@click.argument("float_model", type=click.Path(path_type=Path))
@click.argument("quant_model", type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="Feeds: .npz with a leading sample axis, or a folder of .npz files.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the report as JSON.")
@click.option("--min-sqnr", type=float, help="Exit 2 when a graph output's SQNR is below DB.")
@click.option("--layers/--no-layers", default=True, show_default=True, help="Per-layer comparison.")
@click.option("--max-layers", type=int, default=15, show_default=True, help="Worst layers to print.")
def validate_cmd(float_model: Path, quant_model: Path, data: Path, json_path: Path | None, min_sqnr: float | None,
                 layers: bool, max_layers: int) -> None:
    """Compare QUANT_MODEL with FLOAT_MODEL in onnxruntime: SQNR, cosine, max error, top-1, per layer."""
    from qcompiler import ir
    from qcompiler import validate as qv

    fm = ir.load_model(float_model)
    qm = ir.load_model(quant_model)
    feeds = qv.load_feeds(data, fm)
    report = qv.validate(fm, qm, feeds, per_layer=layers, min_sqnr_db=min_sqnr)
    click.echo(report.table(max_layers=max_layers))
    if json_path is not None:
        with ir.atomic_output(json_path) as tmp:
            tmp.write_text(json.dumps(report.to_json(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if min_sqnr is not None and not report.passed:
        click.echo(f"error: output SQNR {report.worst_output_sqnr():.2f} dB is below --min-sqnr {min_sqnr} dB",
                   err=True)
        sys.exit(2)


# ------------------------------------------------------------------------------------------------ inspect
@cli.command("inspect")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def inspect_cmd(model: Path, as_json: bool) -> None:
    """Opset, inputs/outputs, op histogram, parameter bytes and quantizable nodes of MODEL."""
    from qcompiler import ir
    from qcompiler.plan import Plan

    m = ir.load_model(model)
    info = ir.model_summary(m)
    graph, _ = ir.import_graph(m)
    resolved = Plan.default().resolve(graph)
    quantizable = [n.node for n in resolved.nodes.values() if n.quantized]
    weight_ops = sum(1 for n in graph.nodes if n.op in ("Conv", "ConvTranspose", "Gemm", "MatMul"))
    info["quantizable_nodes"] = quantizable
    info["quantizable_note"] = ("with the default plan; weights held in Constant nodes become initializers in "
                                "the cleanup pass" if weight_ops > len(quantizable) else "with the default plan")
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{model}: ir_version {info['ir_version']}, opset "
               + ", ".join(f"{k} {v}" for k, v in info["opset"].items()) + f", producer '{info['producer']}'")
    click.echo(_table(["input", "dtype", "shape"], [(i["name"], i["dtype"], i["shape"]) for i in info["inputs"]]))
    click.echo(_table(["output", "dtype", "shape"], [(o["name"], o["dtype"], o["shape"]) for o in info["outputs"]]))
    click.echo(f"nodes: {info['nodes']}, parameter bytes: {_bytes(info['parameter_bytes'])}")
    click.echo(_table(["op", "count"], list(info["ops"].items())))
    click.echo(f"quantizable nodes ({info['quantizable_note']}): {len(quantizable)} of {weight_ops} weight ops")
    for name in quantizable[:50]:
        click.echo(f"  {name}")
    if len(quantizable) > 50:
        click.echo(f"  ... {len(quantizable) - 50} more")


# ------------------------------------------------------------------------------------------- passes/targets
@cli.command("passes")
def passes_cmd() -> None:
    """List the registered passes with one-line docs."""
    from qcompiler.registry import registry

    reg = registry()
    rows = [(name, reg.origin[name], cls.summary()) for name, cls in sorted(reg.passes.items())]
    click.echo(_table(["pass", "from", "description"], rows))


@cli.command("targets")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def targets_cmd(as_json: bool) -> None:
    """List runtime targets and what each supports."""
    from qcompiler.runtime_targets import targets

    data = {name: {"description": cls.description, "default_pipeline": cls.default_pipeline,
                   **cls().capabilities()} for name, cls in sorted(targets().items())}
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for name, d in data.items():
        click.echo(f"{name}: {d['description']}")
        click.echo(f"  default pipeline: {d['default_pipeline']}")
        for op, cap in d["ops"].items():
            click.echo(f"  {op}: weights {','.join(cap['weight_dtypes'])}; activations "
                       f"{','.join(cap['activation_dtypes'])}; {','.join(cap['granularities'])}; "
                       f"schemes {','.join(cap['schemes'])}")


# --------------------------------------------------------------------------------------------------- plan
@cli.group("plan")
def plan_group() -> None:
    """Precision plans: preview their resolution, show presets."""


@plan_group.command("resolve")
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("plan", required=False)
@click.option("--target", default="ort", show_default=True)
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Write the resolved plan (YAML) here.")
def plan_resolve_cmd(model: Path, plan: str | None, target: str, output: Path | None) -> None:
    """Show which rule applies to every node of MODEL (after cleanup and BatchNorm folding)."""
    from qcompiler import ir
    from qcompiler.context import CompileContext
    from qcompiler.pass_manager import PassManager
    from qcompiler.plan import load_plan
    from qcompiler.registry import build_pipeline
    from qcompiler.runtime_targets import get_target

    p = load_plan(plan)
    t = get_target(target)
    m = ir.load_model(model)
    graph, meta = ir.import_graph(m, str(model))
    ir.to_float32(graph)
    ctx = CompileContext(graph=graph, meta=meta, plan=p, target=t)
    PassManager(build_pipeline("cleanup,fold-batchnorm,cleanup,resolve-plan")).run(ctx)
    assert ctx.resolved is not None
    text = ctx.resolved.to_yaml()
    if output is not None:
        with ir.atomic_output(output) as tmp:
            tmp.write_text(text, encoding="utf-8")
        click.echo(f"wrote {output}")
    else:
        click.echo(text, nl=False)
    q = ctx.resolved.quantized()
    click.echo(f"# {len(q)} of {len(ctx.resolved.nodes)} nodes quantized; "
               f"{len(ctx.activation_specs)} activation tensors to calibrate", err=True)


@plan_group.command("show")
@click.argument("preset", required=False)
def plan_show_cmd(preset: str | None) -> None:
    """Print a shipped preset plan (without PRESET: list them)."""
    from qcompiler.presets import names, preset_path

    if preset is None:
        for n in names():
            click.echo(n)
        return
    p = preset_path(preset)
    if p is None:
        raise UserError(f"plan show: unknown preset '{preset}' (known: {', '.join(names())})")
    click.echo(p.read_text(encoding="utf-8"), nl=False)


def _register_extra_commands() -> None:
    """Commands living in ``qcompiler/commands/*.py``: each module defines ``register(cli)``."""
    import importlib
    import pkgutil

    import qcompiler.commands as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{pkg.__name__}.{info.name}").register(cli)


_register_extra_commands()


def main() -> None:
    cli(obj={})


if __name__ == "__main__":  # pragma: no cover
    main()
