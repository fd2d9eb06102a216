"""The compile driver below the public API: ``compile_plan(MODEL, OUT, CompileOptions(...))``.

Steps: load (checked, never modified) → parse the plan and pipeline, check the pipeline and the plan against
the target before any rewrite → upgrade the opset when the plan needs it → import into graphsurgeon (fp16
models computed in fp32) → run the passes → restore the fp16 interface → validate in onnxruntime against the
float model (when calibration data was given) → write the model and its side files atomically.
A run that fails writes nothing, except that a failed validation gate (``min_sqnr_db`` on every output's whole
tensor and worst slice, or a check of ``checks`` / the plan's ``checks:``) writes the report (no model) as
``OUT.rejected.report.json``.

The auto planner (``--budget``) sits above this module and compiles through it; :func:`qcompiler.api.compile_model`
hands it in as the ``planner`` of :func:`compile_plan`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import onnx_graphsurgeon as gs

from qcompiler import ir
from qcompiler.calib import input_signatures
from qcompiler.calib.feeds import with_shapes
from qcompiler.calib.npz import member_meta, npz_members, open_zip
from qcompiler.calib.shared import FloatOutputs, shared_source, sharing_sources
from qcompiler.compile_files import _dump_dir, _side_role, _write_rejected_report, compile_outputs
from qcompiler.core import prepared, profile
from qcompiler.core.errors import UserError
from qcompiler.core.numbers import json_tree
from qcompiler.core.pass_manager import PassManager, PassRecord
from qcompiler.core.registry import build_pipeline, get_target, registry
from qcompiler.plan import ALGORITHMS, DEFAULT_PLAN_NAME, Plan, load_plan
from qcompiler.plan.checks import Check, parse_check, parse_shapes
from qcompiler.plan.presets import names as preset_names
from qcompiler.plan.presets import preset_path
from qcompiler.report import cost
from qcompiler.report import validate as qv
from qcompiler.report.latency import check_ratio
from qcompiler.session import Session, keeps_float_function

log = logging.getLogger("qcompiler.api")  # the name the messages of compile have always carried

Progress = Callable[[str, int, int], None]

#: ``compile`` validates graph outputs on up to 64 samples and layers on the first few (per-layer runs expose
#: every intermediate tensor: on PP-OCR rec, 64 samples of it took minutes), as many as fit their tensors (float +
#: quantized) in 2 GiB: PP-OCR det 232 MiB a sample (8), the ViT 697 MiB (2). ``qcompiler validate`` does all.
COMPILE_LAYER_SAMPLES, COMPILE_LAYER_BYTES = 8, 2 << 30
#: a float model of this many parameter bytes or more has memory given back (``ir.trim_memory``) before validation
TRIM_BYTES = 32 << 20
#: validation on calibration data: its first samples; their float outputs kept by calibration up to these bytes
VALIDATION_SAMPLES, FLOAT_OUTPUTS_BYTES = 64, 64 << 20
#: A model the ``min_sqnr_db`` gate refuses is not written; its report is, beside it, as ``OUT`` + this suffix.
REJECTED_REPORT_SUFFIX = ".rejected.report.json"


class Planned(Protocol):
    """What a ``planner`` (the auto planner, for ``--budget``) gives back: the plan to compile, its YAML (written
    beside the model as ``.autoplan.yaml``), a summary for the report, and the budget check of what was written."""

    plan: Plan
    text: str

    def summary(self) -> dict[str, Any]: ...

    def check(self, cost_json: dict[str, Any]) -> None: ...


class RecipeOutcome(Planned, Protocol):
    """A ``recipe``'s :class:`Planned`, with the float outputs it scored against (validation reuses them)."""

    reference: qv.Reference | None


#: ``planner(base_plan)``: the plan to compile instead of the base plan (``--budget``)
Planner = Callable[[Plan], Planned]
#: ``recipe(base_plan, options)``: the measured default or a preset's algorithm guard (:mod:`qcompiler.recipe`);
#: ``options`` are the compile's, with ``plan="auto"`` when the measured default runs
Recipe = Callable[[Plan, "CompileOptions"], RecipeOutcome]
#: the plan name that asks for the measured default (:mod:`qcompiler.recipe`) by name: what a compile with no
#: plan runs when it has real calibration data
AUTO_PLAN = "auto"
#: the measured default holds back a quarter (every 4th) of the calibration samples: it needs at least this many
MIN_RECIPE_SAMPLES = 4


def wants_recipe(opts: CompileOptions, plan: Plan) -> bool:
    """Whether the compile's recipe hook runs: the measured default (``opts.plan == "auto"``, see
    :func:`resolve_default`), or a plan with ``algorithms: {guard: measure}`` and real calibration data to measure
    on (without it the guard leaves the plan as written)."""
    if opts.plan == AUTO_PLAN:
        return True
    if plan.guard != "measure":
        return False
    if not _real_calib(opts):
        log.info("%s: algorithm guard: no real calibration data to measure on; algorithms run as written", plan.source)
        return False
    n = _usable_samples(opts)
    if n is not None and n < MIN_RECIPE_SAMPLES:  # (unreadable data: the compile's own reader says why)
        log.warning("%s: algorithm guard: %s holds %d calibration sample(s), the guard needs at least %d (a quarter "
                    "is held back to measure on); algorithms run as written", plan.source, opts.calib, n,
                    MIN_RECIPE_SAMPLES)
        return False
    return True


def _real_calib(opts: CompileOptions) -> bool:
    return opts.calib is not None and str(opts.calib) not in ("random", "none")


def resolve_default(opts: CompileOptions) -> CompileOptions:
    """The compile's options with the default decided. No plan, preset or budget given: the measured default
    (``plan="auto"``) when there is real calibration data of at least :data:`MIN_RECIPE_SAMPLES` samples, else the
    plain default plan (``plan="default"``) and one INFO line saying why — also with a ``pipeline`` of the user's:
    the candidates would each run its passes. Anything else is returned as given."""
    if opts.plan is not None or opts.preset is not None or opts.budget is not None:
        return opts
    why: str | None
    if opts.pipeline is not None:
        why = "--pipeline given (the measured default compiles its candidates with the target's pipeline)"
    elif opts.calib is None:
        why = "no calibration data (give --calib DIR|FILE.npz to measure candidates on)"
    elif not _real_calib(opts):
        why = f"--calib {opts.calib}: no real samples to measure candidates on"
    else:
        n = _usable_samples(opts)
        why = None if n is not None and n >= MIN_RECIPE_SAMPLES else (
            f"{opts.calib}: not readable as calibration data" if n is None else
            f"{opts.calib}: {n} calibration sample(s); the measured default needs at least {MIN_RECIPE_SAMPLES} "
            "(a quarter is held back to measure candidates on)")
    if why is not None:
        log.info("no plan given: the plain default plan, not the measured default: %s", why)
        return dataclasses.replace(opts, plan=DEFAULT_PLAN_NAME)
    log.info("no plan given: the measured default (--plan default skips it)")
    return dataclasses.replace(opts, plan=AUTO_PLAN)


def _usable_samples(opts: CompileOptions) -> int | None:
    """The calibration samples the compile will read: the data's count (:func:`_count_samples`), at most
    ``--calib-samples``."""
    n = _count_samples(Path(str(opts.calib)))
    return n if n is None or opts.calib_samples is None else min(n, opts.calib_samples)


def _count_samples(path: Path) -> int | None:
    """The number of samples in calibration data ``path`` from the folder listing or the .npz headers alone
    (None: not readable as such; the calibration source names the fault later)."""
    try:
        if path.is_dir():
            return sum(1 for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".npz")
        if path.suffix.lower() != ".npz" or not path.is_file():
            return None
        with open_zip(path) as zf:
            members = npz_members(path, zf)
            if not members:
                return None
            key, member = next(iter(members.items()))
            shape, _ = member_meta(path, zf, key, member)
        return int(shape[0]) if shape else None
    except (UserError, OSError, ValueError):
        return None


@dataclass
class CompileOptions:
    """Everything ``qcompiler compile`` takes (all optional)."""

    plan: str | Path | Plan | None = None  # None: see resolve_default; "default": the plain default plan
    target: str = "ort"
    #: folder / .npz / "random" (synthetic ranges, asked for explicitly) / "none" (data-free: BN statistics);
    #: None: no data — fine for weight-only and dynamic plans, a UserError when activations need static ranges
    calib: str | Path | None = None
    pipeline: str | None = None
    validate: bool | None = None  # None: validate when real calibration data was given
    validate_data: str | Path | None = None  # held-back feeds for validation (defaults to the calib data)
    min_sqnr_db: float | None = None  # gate on every output's whole-tensor and worst-slice SQNR
    #: checks on named output slices (``--check`` text or parsed); the plan's ``checks:`` are added to them
    checks: list[str | Check] = field(default_factory=list)
    #: output name -> the axis its worst slice is measured along (``--slice-axis``; default: see validate.slices)
    slice_axes: dict[str, int] = field(default_factory=dict)
    verify_each: bool = False
    dump_after: set[str] = field(default_factory=set)
    external_data_threshold: int | None = None
    calib_samples: int | None = None
    calib_indices: tuple[int, ...] | None = None  # calibrate on these samples only (the recipe's fit samples)
    collect_for_auto: bool = False  # calibrate also caches what a later calibration: auto reads (same bytes)
    share_float_outputs: bool = False  # calibration's float outputs kept for a later compile's validation (recipe)
    calib_select: int | None = None  # pick N representative samples of the calibration data (calib-select)
    preset: str | None = None  # a shipped plan by name (same as plan=NAME; not both)
    seed: int = 0
    plugins: list[str] = field(default_factory=list)
    report: str | Path | None = None
    # automatic mixed precision (qcompiler.autoplan): plan under this budget first, on top of plan / preset
    budget: str | None = None  # bytes ("4MB"), a fraction of the float bytes ("25%"), "4.5bits", or BitOps
    budget_bitops: bool = False  # the budget counts BitOps
    budget_candidates: str | None = None  # e.g. "int8,int4,ternary" (default int8,int4)
    budget_metric: str = "pd"  # pd | hessian | act-stats | orthogonality
    #: packed target: leave the ai.qcompiler function bodies out (for a runtime with native kernels; stock
    #: onnxruntime cannot run or validate the result)
    strip_function_bodies: bool = False
    #: run ``compact-names`` last: short tensor / node names (graph I/O kept), the map back in OUT.names.json
    compact_names: bool = False
    #: activations (and biases) quantized as planned and lowered, weights put back float afterwards
    #: (``insert-qdq{exact-weights=true}`` ... ``exact-weights``; GPTQ and bias correction left out): what the
    #: activations alone cost (the measured default's ceiling of a GPTQ candidate, ``qcompiler.recipe``)
    exact_weights: bool = False
    #: ``NAME=VALUE`` items: those graph inputs read as constants (``freeze-inputs``, first in the pipeline)
    freeze_inputs: tuple[str, ...] = ()
    #: ``NAME=D0,D1,...`` items: those graph inputs' dimensions fixed (``fix-shapes``, after ``freeze-inputs``)
    input_shapes: tuple[str, ...] = ()
    #: set by :func:`qcompiler.api.compile_model` when it specialized the model first for ``--budget`` with
    #: ``--freeze-input`` / ``--input-shape`` (``model``: the original, ``pipeline``: what made the file compiled
    #: here): the report's ``input`` and ``specialized``; the original stays an input no output may overwrite
    specialized: dict[str, Any] | None = None
    #: validation streams its samples: input -> the graph output fed back into it (``--stream IN=OUT``)
    stream: dict[str, str] = field(default_factory=dict)
    #: where the report goes when the ``min_sqnr_db`` gate refuses the model (default: OUT.rejected.report.json)
    rejected_report: str | Path | None = None
    # the measured default (no plan given and real calibration data, or plan="auto"; qcompiler.recipe) and its
    # constraints; with plan="auto", ``budget`` and ``min_sqnr_db`` are constraints on the candidates (no --budget
    # auto plan). Latency is measured only when asked for (optimize="latency", max_latency_ratio).
    optimize: str = "accuracy"  # accuracy | latency | size
    max_latency_ratio: float | None = None  # onnxruntime latency vs the float model's, on this machine
    #: task metric: f(quantized outputs, float outputs, feeds) -> higher-is-better float (lists of per-sample
    #: dicts), or "module:function" / "file.py:function"
    task_metric: Any = None
    max_drop: float | None = None  # the most the task metric may drop below the float model's
    effort: str | None = None  # low (the default: 4-5 candidates) | normal (<= 8) | high (all)
    recipe_out: str | Path | None = None  # write the winning recipe here as a plan YAML
    #: False: no cost report unless a budget needs it (``report["cost"]`` empty; the measured default's candidate
    #: compiles count the bytes of the files written, which is the report's ``total_bytes``)
    cost_report: bool = True


@dataclass
class CompileResult:
    output: Path
    files: list[Path]
    records: list[PassRecord]
    report: dict[str, Any]
    validation: Any = None
    pipeline: str = ""
    #: where the seconds went (``qcompiler compile --profile``; ``report["profile"]`` is its JSON)
    profile: profile.Profile | None = None


def _check_recipe_options(opts: CompileOptions, given: CompileOptions) -> None:
    """The measured default's options are refused (one line, naming them) where it does not run."""
    check_ratio(opts.max_latency_ratio)
    if opts.plan == AUTO_PLAN:
        return
    named = [name for name, on in (("--optimize", opts.optimize != "accuracy"),  # --budget plans under the ratio
                                   ("--max-latency-ratio", opts.max_latency_ratio is not None and given.budget is None),
                                   ("--max-drop", opts.max_drop is not None),
                                   ("--metric module:function", opts.task_metric is not None),
                                   ("--effort", opts.effort is not None),
                                   ("--recipe-out", opts.recipe_out is not None)) if on]
    if not named:
        return
    if given.plan is None and given.preset is None and given.budget is None:
        where = ("the measured default, which needs real calibration data of at least "
                 f"{MIN_RECIPE_SAMPLES} samples (--calib DIR|FILE.npz)")
    else:
        chosen = given.preset or given.plan
        plan = chosen.source if isinstance(chosen, Plan) else chosen
        where = (f"the measured default (no --plan, or --plan auto), not of --plan {plan}" if given.budget is None
                 else "the measured default, not of --budget")
    raise UserError(f"{', '.join(named)}: {'options' if len(named) > 1 else 'an option'} of {where}")


def _preset_plan(name: str) -> str:
    if preset_path(name) is None:
        raise UserError(f"--preset: unknown preset '{name}' (known: {', '.join(preset_names())})")
    return name


#: Where the plan's ``algorithms`` and ``--calib-select`` go in a pipeline, in this order: (pass, anchor, side).
#: After ``fold-batchnorm`` (and ``fold-scale`` when the pipeline has it): fold-bias (graph normalization the plan must see). After ``resolve-plan`` (BN folded, plan known, nothing calibrated yet): calib-select, equalize, smooth.
#: Before ``insert-qdq`` (ranges calibrated, nothing quantized yet): gptq, then bias-correct (measuring gptq's).
PIPELINE_INSERTIONS = (
    ("fold-bias", "fold-batchnorm", "after"),
    ("calib-select", "resolve-plan", "after"),
    ("equalize", "resolve-plan", "after"),
    ("smooth", "resolve-plan", "after"),
    ("gptq", "insert-qdq", "before"),
    ("bias-correct", "insert-qdq", "before"),
)


#: the passes that choose weight values (codes, corrected biases): left out with ``exact_weights``
WEIGHT_VALUE_PASSES = ("gptq", "bias-correct")


def assemble_pipeline(text: str, plan: Plan, reg: Any = None, *, calib_select: int | None = None) -> list[Any]:
    """The passes of pipeline ``text`` plus those the plan's ``algorithms`` (and ``calib_select``) turn on, each
    inserted at its place (:data:`PIPELINE_INSERTIONS`), minus those it turns off (``fold_bias: false`` removes
    the default pipeline's ``fold-bias``). A pass the text names already keeps the text's options; an algorithm
    whose anchor the pipeline lacks is left out with a warning."""
    reg = reg or registry()
    passes = build_pipeline(text, reg)
    off = {ALGORITHMS[name] for name in plan.disabled_algorithms}
    if any(p.name in off for p in passes):
        log.info("plan turns off %s: left out of the pipeline", ", ".join(sorted(off)))
        passes = [p for p in passes if p.name not in off]
    wanted = {ALGORITHMS[name]: dict(opts) for name, opts in plan.algorithms.items()}
    if calib_select is not None:
        wanted["calib-select"] = {"n": calib_select}
    order = [name for name, _, _ in PIPELINE_INSERTIONS]
    for name, anchor, side in PIPELINE_INSERTIONS:
        if name not in wanted or any(p.name == name for p in passes):
            continue
        at = next((i for i, p in enumerate(passes) if p.name == anchor), None)
        if at is None:
            log.warning("pipeline has no '%s': '%s' (from the plan) left out", anchor, name)
            continue
        if side == "after":
            at += 1
            if name == "fold-bias" and at < len(passes) and passes[at].name == "fold-scale":
                at += 1  # the Add a folded Mul leaves behind is a bias too
            while at < len(passes) and passes[at].name in order[:order.index(name)]:
                at += 1  # after the algorithms that come before this one
        passes.insert(at, reg.get(name)(**wanted[name]))
    return passes


def compile_plan(model_path: str | os.PathLike[str], output_path: str | os.PathLike[str],
                 options: CompileOptions | None = None, progress: Progress | None = None, *,
                 planner: Planner | None = None, recipe: Recipe | None = None) -> CompileResult:
    """Compile ``model_path`` to ``output_path``; raises :class:`UserError` for bad input. ``options.budget``
    needs a ``planner`` (:func:`qcompiler.api.compile_model` gives the auto planner), ``plan="auto"`` and guarded
    plans a ``recipe`` (the measured default, :mod:`qcompiler.recipe`). With a ``recipe`` and no plan given, the
    default is decided by :func:`resolve_default` (the measured default on real calibration data); without one
    (autoplan's probe compiles, the recipe's candidates) no plan means the plain default plan. Every step is timed
    (:mod:`qcompiler.core.profile`): ``result.profile``, and ``report["profile"]``."""
    prof = profile.Profile()
    imported = profile.import_seconds()  # the command line's imports (None from Python)
    if imported is not None:
        prof.add("import", imported)
    # nested compiles (a recipe's candidates) share calibration sources and, once declared, the prepared graph
    with prof.active(), sharing_sources(), prepared.sharing():
        result = _compile_plan(model_path, output_path, options, progress, planner=planner, recipe=recipe, prof=prof)
    result.profile = prof
    return result


def _compile_plan(model_path: str | os.PathLike[str], output_path: str | os.PathLike[str],
                  options: CompileOptions | None, progress: Progress | None, *, planner: Planner | None,
                  recipe: Recipe | None, prof: profile.Profile) -> CompileResult:
    opts = options or CompileOptions()
    t_start = time.perf_counter()
    src, out = Path(model_path), Path(output_path)
    if out.suffix != ".onnx":
        raise UserError(f"{out}: output file must end in .onnx")
    if out.is_dir():
        raise UserError(f"{out}: is a directory; -o needs a file name ending in .onnx")
    # Every path this run may write is checked against every input (and its place) before any work, and
    # everything is staged and moved into place together at the end (qcompiler.ir.outputs).
    with compile_outputs(src, out, opts) as outs:
        return _compile(src, out, opts, outs, progress, planner, t_start, prof, recipe)


#: Side files of ``OUT.onnx`` (suffix after ``OUT``'s stem) and how messages name them.
def _compile(src: Path, out: Path, opts: CompileOptions, outs: ir.OutputSet, progress: Progress | None,
             planner: Planner | None, t_start: float, prof: profile.Profile,
             recipe: Recipe | None = None) -> CompileResult:
    with profile.step("setup (passes, target, plan)"):
        reg = registry()
        for spec in opts.plugins:
            reg.load_plugin(spec)
        target = get_target(opts.target)
        if opts.preset is not None and opts.plan is not None:
            raise UserError("--preset and --plan both given; a preset is a plan: give one of them")
        if recipe is not None:  # no plan given: the measured default on real data, else the plain default plan
            given, opts = opts, resolve_default(opts)  # (without one: a candidate's or a probe's own compile)
            _check_recipe_options(opts, given)
        plan = opts.plan if isinstance(opts.plan, Plan) else Plan.default() if opts.plan == AUTO_PLAN else load_plan(
            opts.plan if opts.preset is None else _preset_plan(opts.preset))
    target.check_options(plan.target_options, plan.source)  # a bad targets: section fails before any work
    measured = None
    if wants_recipe(opts, plan):  # the measured default or a preset's algorithm guard
        if opts.plan == AUTO_PLAN and not _real_calib(opts):
            raise UserError("--plan auto measures its candidates on real data: give --calib DIR|FILE.npz")
        if recipe is None and opts.plan == AUTO_PLAN:
            raise ValueError("compile_plan: plan 'auto' needs a recipe (qcompiler.api.compile_model)")
        if recipe is not None:  # without one (autoplan's probe compiles) a guarded plan runs as written
            prepared.expect_reuse()  # the candidates and this compile import and prepare the model once
            with profile.step("measured recipe"):
                measured = recipe(plan, opts)
            plan = measured.plan
    checks = [parse_check(c) if isinstance(c, str) else c for c in opts.checks] + list(plan.checks)
    auto = None
    if opts.budget is not None and opts.plan != AUTO_PLAN:  # mixed precision under a budget: planned first
        for flag, items in (("--input-shape", opts.input_shapes), ("--freeze-input", opts.freeze_inputs)):
            if items:  # qcompiler.api.compile_model specializes the model first; compile_plan alone cannot
                raise UserError(f"{flag}: not with --budget in compile_plan (the planner measures the model as "
                                "given): use qcompiler.api.compile_model, which specializes the model first")
        if planner is None:
            raise ValueError("compile_plan: options.budget needs a planner (qcompiler.api.compile_model)")
        prepared.expect_reuse()  # the planner's probes compile this model again and again
        with profile.step("auto plan (--budget)"):
            auto = planner(plan)
        plan = auto.plan
    calib_word = None if opts.calib is None else str(opts.calib)
    if opts.calib_select is not None and (calib_word is None or calib_word in ("random", "none")):
        raise UserError("--calib-select needs a pool of real calibration data to choose from (--calib DIR|FILE.npz)")
    pipeline_text = opts.pipeline if opts.pipeline is not None else target.default_pipeline  # '' is an error
    passes = assemble_pipeline(pipeline_text, plan, reg, calib_select=opts.calib_select)
    if opts.input_shapes and not any(p.name == "fix-shapes" for p in passes):
        passes.insert(0, reg.get("fix-shapes")(shapes=tuple(opts.input_shapes)))
    if opts.freeze_inputs and not any(p.name == "freeze-inputs" for p in passes):
        passes.insert(0, reg.get("freeze-inputs")(inputs=tuple(opts.freeze_inputs)))
    if opts.compact_names and not any(p.name == "compact-names" for p in passes):
        passes.append(reg.get("compact-names")())
    if opts.exact_weights:  # after the lowering, before compact-names renames the recorded tensors
        passes = [reg.get("insert-qdq")(exact_weights=True) if p.name == "insert-qdq" else p for p in passes
                  if p.name not in WEIGHT_VALUE_PASSES]
        at = next((i for i, p in enumerate(passes) if p.name == "compact-names"), len(passes))
        passes.insert(at, reg.get("exact-weights")())
    pm = PassManager(passes, verify_each=opts.verify_each, dump_after=set(opts.dump_after),
                     dump_dir=_dump_dir(out) if opts.dump_after else None,
                     on_pass=(lambda name, i, n: progress(f"pass:{name}", i, n)) if progress else None)
    pm.check({"model"})

    with profile.step("load"):
        session = Session.load(src, plan, target)
    float_model = session.model
    # Refuse a plan the target cannot run before any rewrite (Session.import_graph), after the opset upgrade.
    with profile.step("import graph"):
        graph = session.import_graph(upgrade=True, check=True, prepare=passes[:0 if opts.verify_each or opts.dump_after
                                                                                else prepared.prefix_length(passes)])
    io_dtypes = session.io_dtypes

    calib_source = None
    calib_arg = None if opts.calib is None else str(opts.calib)
    if calib_arg is not None and calib_arg != "none":
        with profile.step("calibration data"):
            # the candidates of a measured recipe and the final compile read one source (checked, digested once)
            sigs = with_shapes(input_signatures(graph), parse_shapes(opts.input_shapes))  # --input-shape's dims
            calib_source = shared_source(calib_arg, sigs, seed=opts.seed, limit=opts.calib_samples)
            if opts.calib_indices is not None:
                calib_source = calib_source.subset(opts.calib_indices)
    ctx = session.context(calib=calib_source, output_path=out, seed=opts.seed, data_free=calib_arg == "none")
    if calib_arg is None:  # no --calib: static activation ranges are refused, not silently calibrated on noise
        ctx.require_calibration_data = True
    random_shapes = getattr(calib_source, "shapes", None) if calib_source is not None and calib_source.synthetic \
        else None
    if random_shapes:
        log.info("calibration: random inputs of shape %s",
                 ", ".join(f"{k} [{', '.join(str(d) for d in v)}]" for k, v in random_shapes.items()))
    if progress is not None:
        ctx.progress = progress
    if opts.strip_function_bodies:
        ctx.strip_function_bodies = True
    if calib_source is not None and not calib_source.synthetic and (opts.share_float_outputs or (
            opts.validate is not False and opts.validate_data is None)) and keeps_float_function(passes, "calibrate"):
        ctx.float_outputs = FloatOutputs(VALIDATION_SAMPLES, FLOAT_OUTPUTS_BYTES, share=opts.share_float_outputs)
    ctx.collect_for_auto = opts.collect_for_auto
    records = session.run_passes(pm, ctx)
    if random_shapes and isinstance(ctx.report.get("calibration"), dict) and ctx.report["calibration"].get("synthetic"):
        ctx.report["calibration"]["random_shapes"] = {k: list(v) for k, v in random_shapes.items()}
    stripped = ctx.function_bodies_stripped
    if stripped and (opts.validate or opts.validate_data is not None or opts.min_sqnr_db is not None
                     or opts.checks):
        raise UserError("--strip-function-bodies: the custom ops have no function bodies left, so stock "
                        "onnxruntime cannot validate the model; validate a build without the option (same codes)")

    with profile.step("restore io dtypes"):
        ir.restore_io_dtypes(ctx.graph, io_dtypes)
    threshold = opts.external_data_threshold
    if threshold is None and ir.has_external_data(float_model):
        threshold = ir.DEFAULT_EXTERNAL_THRESHOLD  # external data in, external data out
    big = ir.parameter_bytes(float_model) >= ir.NO_PREPACK_BYTES
    # Everything is written into the staging folders (model tensor by tensor, external data streamed), checked
    # and validated from there, and moved into place only when the whole compile succeeded.
    staged = outs.path(out)
    with profile.step("export + write"):
        ir.write_model(ctx.graph, ctx.meta, staged, external_data_threshold=threshold, consume=True)
    # The graph is on disk now: free its (quantized) weights before validation opens sessions (which trims
    # memory itself; a large model is trimmed now, before the cost report imports the written one).
    ir.release_graph(ctx.graph, trim=big)
    ctx.graph = gs.Graph(opset=ctx.graph.opset)
    del graph
    session.graph = None
    with profile.step("check written model"):
        qmodel = ir.load_model(staged, check=False)
        ir.check_model(qmodel, where="compiled model")

    report: dict[str, Any] = {
        "input": str(src),
        "output": str(out),
        "target": target.name,
        "pipeline": pm.pipeline_text(),
        "opset": ir.opset_of(qmodel),
        "passes": [r.to_json() for r in records],
        **{k: v for k, v in ctx.report.items() if not k.startswith("_")},
    }
    if opts.specialized is not None:  # the user's model, and what specialized it (qcompiler.api)
        report["input"] = str(opts.specialized["model"])
        report["specialized"] = dict(opts.specialized)
    float_bytes = ir.model_summary(float_model)["parameter_bytes"]
    quant_bytes = ir.model_summary(qmodel)["parameter_bytes"]
    report["sizes"] = {"float_parameter_bytes": float_bytes, "quantized_parameter_bytes": quant_bytes,
                       "ratio": round(quant_bytes / float_bytes, 4) if float_bytes else None}
    known = (ctx.calib_shapes or None) if calib_source is not None else None
    report["cost"] = {}
    if opts.cost_report or opts.budget is not None:  # a budget is checked on the report
        with profile.step("cost report"):
            report["cost"] = cost.compile_cost(qmodel, staged, calib_source, shapes=not big,
                                               known_shapes=known).to_json()
    if ctx.renamed.get("nodes"):  # compact-names: the report names layers as the compiled graph did
        back = ctx.renamed["nodes"]
        for layer in report["cost"].get("layers", []):
            layer["name"] = back.get(layer.get("name"), layer.get("name"))
    if auto is not None:  # the budget holds for what is written, counted as `inspect --cost` counts it
        report["autoplan"] = auto.summary()
        ctx.side_outputs[".autoplan.yaml"] = auto.text
        auto.check(report["cost"])
    if measured is not None:
        report["recipe"] = measured.summary()
        measured.check(report["cost"])
        if opts.recipe_out is not None:
            outs.path(opts.recipe_out).write_text(measured.text, encoding="utf-8")

    validation = None
    do_validate = opts.validate if opts.validate is not None else (
        calib_source is not None and not calib_source.synthetic) or opts.validate_data is not None
    if stripped:
        do_validate = False
        report["validation_skipped"] = "function bodies stripped: the model needs native kernels"
    if do_validate:
        if opts.validate_data is not None:
            feeds: Any = qv.load_feeds(opts.validate_data, float_model, parse_shapes(opts.input_shapes))
        elif calib_source is not None:
            feeds = list(itertools.islice(calib_source, VALIDATION_SAMPLES))
        else:
            raise UserError("validation needs data: give --calib DATA or --validate-data FILE.npz")
        if progress:
            progress("validate", 0, 1)
        if float_bytes >= TRIM_BYTES:  # the graphs imported for the report above are cycles: unmap their weights
            ir.trim_memory()  # (a full collection and malloc_trim: 0.03-0.07 s, worth it for a large model only)
        # Large models: outputs only (per-layer sessions would hold the float weights twice more).
        with profile.step("validation"):
            validation = qv.validate(float_model, qmodel, feeds, min_sqnr_db=opts.min_sqnr_db,
                                     per_layer=not big,
                                     optimize=True if target.validation_optimization == "all" else "basic",
                                     layer_samples=COMPILE_LAYER_SAMPLES, layer_bytes=COMPILE_LAYER_BYTES,
                                     names=ctx.renamed.get("tensors"),
                                     progress=(lambda d, t: progress("validate", d, t)) if progress else None,
                                     checks=checks, slice_axes=opts.slice_axes or None,
                                     stream=opts.stream or None, float_label=str(src),
                                     calib_outputs=None if ctx.float_outputs is None else ctx.float_outputs.values,
                                     float_outputs=qv.known_outputs(None if measured is None else measured.reference, src, feeds))
        if ctx.resolved is not None:  # each layer's node and the plan rule that decided it
            validation.attach_plan({n.node: n.to_dict() for n in ctx.resolved.nodes.values()},
                                   ctx.renamed.get("nodes"))
        report["validation"] = validation.to_json()
        if validation.gated and not validation.passed:
            rejected = _write_rejected_report(report, src, opts, Path(opts.rejected_report) if opts.rejected_report
                                              else out.with_name(out.stem + REJECTED_REPORT_SUFFIX))
            raise UserError(f"validation: {validation.failure()}; no model written, the validation report is in "
                            f"{rejected}")
    elif opts.min_sqnr_db is not None or opts.checks:
        raise UserError(f"{'--min-sqnr' if opts.min_sqnr_db is not None else '--check'} needs validation data: "
                        "give --calib DATA or --validate-data FILE.npz")
    elif checks:
        log.warning("%s: the plan's checks were not measured (no validation: give --calib DATA or --validate-data "
                    "FILE.npz)", plan.source)

    with profile.step("side files"):
        for suffix, text in sorted(ctx.side_outputs.items()):
            side = out.with_name(out.stem + suffix)
            if not outs.declared(side):  # a plugin's side file: checked now, before anything is moved
                outs.add_output(side, _side_role(suffix))
            outs.path(side).write_text(text, encoding="utf-8")
    report["seconds"] = round(time.perf_counter() - t_start, 3)
    report["profile"] = prof.to_json()  # up to here; the report file and the move into place follow
    if opts.report is not None:
        with profile.step("report file"):
            outs.path(opts.report).write_text(json.dumps(json_tree(report), indent=2, sort_keys=True) + "\n",
                                              encoding="utf-8")
    with profile.step("move into place"):
        written = outs.commit()  # all together, or (rolled back) none
    report_file = Path(opts.report) if opts.report is not None else None
    files = sorted((f for f in written if f != report_file), key=lambda f: (f != out, f.name))
    files += [f for f in written if f == report_file]
    return CompileResult(output=out, files=files, records=records, report=report, validation=validation,
                         pipeline=pm.pipeline_text())
