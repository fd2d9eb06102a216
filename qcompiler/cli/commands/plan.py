"""``qcompiler plan``: plan mixed precision under a budget (``plan MODEL`` is ``plan auto MODEL``), preview a
plan's resolution on a model (``plan resolve``), show the shipped presets (``plan show``)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import click
import yaml

from qcompiler import autoplan, ir
from qcompiler.api import specialize_model
from qcompiler.cli.terminal import Progress, table
from qcompiler.core.errors import UserError
from qcompiler.core.registry import get_target
from qcompiler.plan import DEFAULT_PLAN_NAME, Plan, load_plan, presets
from qcompiler.report.cost import format_bytes, format_count
from qcompiler.session import run_prefix


class _PlanGroup(click.Group):
    """``qcompiler plan MODEL ...`` is ``qcompiler plan auto MODEL ...`` (when MODEL is no sub-command name)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["auto", *args]
        return super().parse_args(ctx, args)


@click.group("plan", cls=_PlanGroup)
def plan_group() -> None:
    """Precision plans: plan mixed precision under a budget (qcompiler plan MODEL --budget ...), preview a
    plan's resolution, show presets."""


@plan_group.command("resolve")
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("plan", required=False)
@click.option("--target", default="ort", show_default=True)
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Write the resolved plan (YAML) here.")
def plan_resolve_cmd(model: Path, plan: str | None, target: str, output: Path | None) -> None:
    """Show which rule applies to every node of MODEL (after the target's graph clean-up: cleanup, BatchNorm
    folding, activation fusion)."""
    outs = ir.OutputSet()  # -o may not be (or alias) the model, its data or the plan: checked before any work
    outs.add_input(model, "model", model=True)
    if plan is not None and Path(plan).is_file():
        outs.add_input(plan, "plan")
    if output is not None:
        outs.add_output(output, "-o", primary=True)
    with outs:
        p = load_plan(plan)
        t = get_target(target)
        # the target's own pipeline up to resolve-plan: the nodes (and names) the compile will see
        ctx = run_prefix(model, p, t)
        assert ctx.resolved is not None
        text = ctx.resolved.to_yaml()
        if output is not None:
            outs.path(output).write_text(text, encoding="utf-8")
            outs.commit()
    if output is not None:
        click.echo(f"wrote {output}")
    else:
        click.echo(text, nl=False)
    q = ctx.resolved.quantized()
    click.echo(f"# {len(q)} of {len(ctx.resolved.nodes)} nodes quantized; "
               f"{len(ctx.activation_specs)} activation tensors to calibrate", err=True)


@plan_group.command("show")
@click.argument("preset", required=False)
def plan_show_cmd(preset: str | None) -> None:
    """Print a shipped preset plan (without PRESET: list them; 'default': the plain default plan)."""
    if preset is None:
        for n in presets.names():
            click.echo(n)
        return
    if preset == DEFAULT_PLAN_NAME:
        click.echo(yaml.safe_dump(Plan.default().to_dict(), sort_keys=False, default_flow_style=None, width=120),
                   nl=False)
        return
    p = presets.preset_path(preset)
    if p is None:
        raise UserError(f"plan show: unknown preset '{preset}' (known: {', '.join(presets.names())})")
    click.echo(p.read_text(encoding="utf-8"), nl=False)


@plan_group.command("auto")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--budget", required=True,
              help="Bytes of the output files (4000000, 4MB; KB/MB/GB are 1024-based), a fraction of the float "
                   "model's bytes (25%), average weight bits (4.5bits), or BitOps with --bitops (1.5G, 50%).")
@click.option("--bitops", is_flag=True, help="The budget counts BitOps (MACs x weight bits x activation bits).")
@click.option("--calib", help="Calibration data (folder of .npz, stacked .npz, or 'random'): the sensitivity "
                              "batch is its first --samples samples.")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Write the plan here (default: print it).")
@click.option("--candidates",
              help="Precisions a layer may take (default int8,int4, less what the target runs on no layer): fp32, "
                   "int8, int4, uint8, int16, fp8e4m3, ternary, binary, shift4, and int3 / int2 (uniform, "
                   "bit-packed: --target packed) ...; suffixes /tensor, /channel, /blockN, then /sym or /asym, "
                   "then /f16 (float16 scales): int4/block32/sym/f16")
@click.option("--metric", type=click.Choice(["pd", "hessian", "act-stats", "orthogonality"]), default="pd",
              show_default=True, help="Sensitivity: PD-Quant output change, HAWQ-V2 Hessian trace (forward "
                                      "only), myQASR activation statistics, OMPQ orthogonality.")
@click.option("--target", default="ort", show_default=True, help="Runtime target the plan is for.")
@click.option("--plan", "base_plan", help="Base plan (file or preset): defaults, activation specs, rules.")
@click.option("--samples", type=click.IntRange(min=1), default=8, show_default=True,
              help="Calibration samples for the sensitivity (more for classifiers with few, confident outputs).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Samples of one shape evaluated together.")
@click.option("--solver", type=click.Choice(["dp", "lagrange"]), default="dp", show_default=True,
              help="Knapsack: exact DP over the discretized budget, or Lagrangian relaxation.")
@click.option("--draws", type=click.IntRange(min=1), default=2, show_default=True,
              help="--metric hessian: Hutchinson draws per layer.")
@click.option("--select", type=click.IntRange(min=0), default=8, show_default=True,
              help="Measure the plan and N Pareto neighbours that fit with all their layers quantized at once "
                   "(one evaluation each) and keep the best; 0: the knapsack's plan as is.")
@click.option("--refine", type=click.IntRange(min=0), default=0, show_default=True,
              help="--metric pd: re-measure the sensitivities around the plan found and re-solve, up to N times "
                   "(for tight budgets, where many coarse layers compound).")
@click.option("--exchange", type=click.IntRange(min=0), default=0, show_default=True,
              help="--metric pd: up to N rounds of measured exchanges around the plan (a few layers up, a few "
                   "down, each candidate measured whole; kept only when the measured distortion drops).")
@click.option("--pareto", type=click.Path(path_type=Path),
              help="Write the Pareto front as CSV here, and its plot as SVG beside it (.svg).")
@click.option("--measure", type=click.IntRange(min=0), default=5, show_default=True,
              help="With --pareto: compile N front points (and the plan) and measure their output SQNR.")
@click.option("--validate-data", type=click.Path(path_type=Path),
              help="Held-back feeds the plans are measured on (default: --holdout calibration samples spread over "
                   "them, which the measuring compiles then leave out).")
@click.option("--holdout", type=click.IntRange(min=0), default=autoplan.HOLDOUT, show_default=True,
              help="Calibration samples held back (spread over them: every 4th for 16 of 64; at most a quarter) "
                   "to measure the uniform presets and the plans on, compiled for real; 0: measure nothing.")
@click.option("--presets/--no-presets", default=True, show_default=True,
              help="Without --plan: start from the best shipped preset that fits the budget (measured), and "
                   "return it when no mixed plan measures better.")
@click.option("--max-latency-ratio", type=click.FloatRange(min=0, min_open=True),
              help="Return only a plan whose onnxruntime latency is at most R times the float model's (one thread, "
                   "best of 3 on the held-back samples); the uniform base is chosen among those within it. "
                   "Default: nothing timed.")
@click.option("--freeze-input", "freeze_inputs", multiple=True, metavar="NAME=VALUE",
              help="Plan the model specialized for a fixed value of graph input NAME (repeatable; as compile's "
                   "--freeze-input, which the plan is then compiled with).")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=D0,D1,...",
              help="Plan the model with the dynamic dimensions of graph input NAME fixed (repeatable; as "
                   "compile's --input-shape, which the plan is then compiled with).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for synthetic data and draws.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or summary.")
def plan_auto_cmd(model: Path, budget: str, bitops: bool, calib: str | None, output: Path | None, candidates: str | None,
                  metric: str, target: str, base_plan: str | None, samples: int, batch_size: int, solver: str,
                  draws: int, select: int, refine: int, exchange: int, pareto: Path | None, measure: int,
                  validate_data: Path | None, holdout: int, presets: bool, max_latency_ratio: float | None,
                  freeze_inputs: tuple[str, ...], input_shapes: tuple[str, ...], seed: int, quiet: bool) -> None:
    """Plan mixed precision for MODEL: the most accurate plan within --budget (also `qcompiler plan MODEL`).
    With --freeze-input / --input-shape the model is specialized first (a float model in a temporary folder:
    those passes and cleanup only) and that is what is planned; compile the plan with the same flags."""
    opts = autoplan.PlanOptions(budget=autoplan.Budget.parse(budget, bitops=bitops),
                                candidates=autoplan.parse_candidates(candidates or autoplan.DEFAULT_CANDIDATES),
                                default_candidates=candidates is None, metric=metric, target=target,
                                base_plan=base_plan, samples=samples, batch_size=batch_size, solver=solver,
                                draws=draws, select=select, refine=refine, exchange=exchange, seed=seed,
                                presets=presets, holdout=holdout, validate_data=validate_data,
                                max_latency_ratio=max_latency_ratio)
    if pareto is not None and pareto.suffix.lower() != ".csv":
        raise UserError(f"--pareto: '{pareto}' must end in .csv (the plot goes beside it as .svg)")
    if measure and pareto is not None and (calib is None or calib in ("random", "none")):
        raise UserError("--measure needs real calibration data (--calib DATA), or give --measure 0")
    outs = ir.OutputSet()  # -o / --pareto (+ its .svg) checked against every input before any work
    outs.add_input(model, "model", model=True)
    if calib is not None and calib not in ("random", "none"):
        outs.add_input(calib, "calibration data")
    if base_plan is not None and Path(base_plan).is_file():
        outs.add_input(base_plan, "plan")
    outs.add_input(validate_data, "validation data")
    if output is not None:
        outs.add_output(output, "-o", primary=True)
    if pareto is not None:
        outs.add_output(pareto, "--pareto")
        outs.add_output(pareto.with_suffix(".svg"), "--pareto plot")
    progress = Progress(enabled=not quiet and sys.stderr.isatty())
    with outs, tempfile.TemporaryDirectory(prefix="qcompiler-specialized-") as tmp:
        try:
            src = model
            if freeze_inputs or input_shapes:  # the planner measures the file it is given: the specialized model
                src = Path(tmp) / model.name
                specialize_model(model, src, freeze_inputs, input_shapes, target=target)
            result = autoplan.auto_plan(src, calib, opts, progress=progress)
            measured = []
            if pareto is not None and measure:
                assert calib is not None
                measured = autoplan.measure_front(src, result, calib, points=measure, validate_data=validate_data,
                                                  progress=progress)
        finally:
            progress.close()
        if output is not None:
            outs.path(output).write_text(result.text, encoding="utf-8")
        if pareto is not None:
            outs.path(pareto).write_text(autoplan.front_csv(result), encoding="utf-8")
            outs.path(pareto.with_suffix(".svg")).write_text(autoplan.front_svg(result), encoding="utf-8")
        written = outs.commit()
    if output is None:
        click.echo(result.text, nl=False)
    if quiet:
        return
    err = output is None  # the plan went to stdout: the summary goes to stderr
    names = result.candidates
    rows = []
    for li, la in enumerate(result.layers):
        ci = result.choice[li]
        rows.append((la.name, la.op_type, la.params, names[ci],
                     " ".join(f"{c}={result.sensitivity.values[li, j]:.3g}" for j, c in enumerate(names)
                              if c in la.allowed),
                     round(float(result.cost_table["bytes"][li, ci]))))
    click.echo(table(["layer", "op", "params", "choice", f"sensitivity ({metric})", "bytes"], rows), err=err)
    p, v = result.predicted, result.verified
    sq = p.get("sqnr_db")
    unit = result.unit
    limit = (format_bytes(result.budget_value) + f" ({int(result.budget_value)} bytes)" if unit == "bytes" else
             f"{format_count(result.budget_value)} BitOps" if unit == "bitops" else f"{result.budget_value:g} bits")
    click.echo(f"budget: {result.budget.describe()} -> {limit}", err=err)
    m, b = result.measured, result.baseline
    if b.get("presets"):
        click.echo("presets: " + ", ".join(
            f"{r['name']} {r['bytes']} B" + (f" {r['sqnr_db']:.2f} dB" if r.get("sqnr_db") is not None else
                                             " (over)" if not r.get("fits") else "") + _latency(r)
            for r in b["presets"] if "bytes" in r), err=err)
    mixed = ("best mixed plan: " if result.uniform else "plan: ") + ", ".join(
        f"{k} x{n}" for k, n in result.counts().items() if n)
    click.echo(mixed + f"; predicted {round(p['bytes'])} bytes, {format_count(p['bitops'])} BitOps, "
               f"{p['avg_bits']:.3f} avg weight bits"
               + (f", predicted output SQNR {sq:.2f} dB (additive model)" if sq is not None else "")
               + (f"; measured {m['mixed']['sqnr_db']:.2f} dB" if result.uniform else ""), err=err)
    if result.uniform:
        click.echo(f"plan: the uniform {b['name']}, {m['bytes']} bytes (no mixed plan measured better)", err=err)
    else:
        click.echo(f"verified: compiled plan takes {v['bytes']} bytes"
                   + (f", {format_count(v['bitops'])} BitOps" if v.get("bitops") is not None else "")
                   + f" ({result.rounds} round(s)); within the budget", err=err)
    if m:
        click.echo(f"measured: output SQNR {m['sqnr_db']:.2f} dB (compiled, onnxruntime on {m['data']})"
                   + _latency(m, ", latency")
                   + (f"; uniform {b['name']} alone {b['sqnr_db']:.2f} dB" + _latency(b, ", latency")
                      if not result.uniform and b.get("sqnr_db") is not None else ""), err=err)
    else:
        click.echo("measured: nothing (no calibration data, or --holdout 0): the SQNR above is predicted", err=err)
    lat = b.get("latency")
    if lat:
        click.echo(f"latency: at most {lat['max_ratio']:g}x float (onnxruntime, 1 thread, float "
                   f"{lat['float_seconds'] * 1e3:.3g} ms on the held-back samples); {len(lat['timed'])} plan(s) timed"
                   + (f"; not eligible: {', '.join(lat['not_eligible'])}" if lat["not_eligible"] else ""), err=err)
    act = b.get("activations") or {}
    if act.get("tried"):
        click.echo(f"activations: 16-bit on {act['tensors']} tensor(s) read only by layers that run float anyway "
                   f"(no integer kernel for their weights; same ops, latency unchanged in kind): measured "
                   f"{act['sqnr_db']:.2f} dB, {act['bytes']} bytes"
                   + _latency(act, ", latency") + ("; kept" if act["kept"] else "; over the budget, not kept" if not act["fits"] else
                                      "; over the latency limit, not kept" if act.get("over_latency") else
                                      "; not better by the guard's rule" + _draws(act) + ", not kept"), err=err)
    sc = b.get("scales") or {}
    if sc.get("tried"):
        click.echo(f"float16 scales: {sc['tried']} move(s) of one layer to finer blocks with float16 scales measured: "
                   + (f"{sc['kept']} kept" if sc.get("kept") else "none better by the guard's rule within the budget"),
                   err=err)
    for pt in measured:
        click.echo(f"front point {round(pt.bytes)} bytes: predicted "
                   + ("n/a" if pt.predicted_sqnr_db is None else f"{pt.predicted_sqnr_db:.2f} dB")
                   + f", measured {pt.measured_sqnr_db:.2f} dB" + ("  (the plan)" if pt.chosen else ""), err=err)
    t = result.timings
    click.echo(f"time: {t['total']:.1f} s (sensitivity {t['sensitivity']:.1f} s over {result.sensitivity.samples} "
               f"samples, {result.sensitivity.evaluations} evaluations; costs {t['costs']:.1f} s)", err=err)
    for f in written:
        click.echo(f"wrote {f}", err=err)


def _draws(row: dict[str, object]) -> str:
    """`` (won 45 % of the bootstrap draws)`` where the planner measured it (``win_rate``), else nothing."""
    rate = row.get("win_rate")
    if not isinstance(rate, float):
        return ""
    return f" (won {100 * rate:.0f} % of the held-back samples' bootstrap draws)"


def _latency(row: dict[str, object], lead: str = "") -> str:
    """`` 1.23x float`` for a row that was timed (``--max-latency-ratio``), `` (not eligible)`` added when over;
    nothing for a row that was not."""
    ratio = row.get("latency_ratio")
    if not isinstance(ratio, float):
        return ""
    return f"{lead} {ratio:.2f}x float" + (" (not eligible)" if row.get("over_latency") else "")


def register(cli: click.Group) -> None:
    cli.add_command(plan_group)
