"""The compile driver below the public API: ``compile_plan(MODEL, OUT, CompileOptions(...))``.

Steps: load (checked, never modified) → parse the plan and pipeline, check the pipeline and the plan against
the target before any rewrite → upgrade the opset when the plan needs it → import into graphsurgeon (fp16
models computed in fp32) → run the passes → restore the fp16 interface → validate in onnxruntime against the
float model (when calibration data was given) → write the model and its side files atomically.
A run that fails (including a failed ``min_sqnr_db`` gate) writes nothing.

The auto planner (``--budget``) sits above this module and compiles through it; :func:`qcompiler.api.compile_model`
hands it in as the ``planner`` of :func:`compile_plan`.
"""

from __future__ import annotations

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
from qcompiler.calib import CalibrationSource, input_signatures
from qcompiler.core import profile
from qcompiler.core.errors import UserError
from qcompiler.core.pass_manager import PassManager, PassRecord
from qcompiler.core.registry import build_pipeline, get_target, registry
from qcompiler.plan import ALGORITHMS, Plan, load_plan
from qcompiler.plan.presets import names as preset_names
from qcompiler.plan.presets import preset_path
from qcompiler.report import cost
from qcompiler.report import validate as qv
from qcompiler.session import Session

log = logging.getLogger("qcompiler.api")  # the name the messages of compile have always carried

Progress = Callable[[str, int, int], None]

#: ``compile`` validates graph outputs on up to 64 samples and layers on the first few (per-layer runs expose
#: every intermediate tensor: on PP-OCR rec, 64 samples of it took minutes). ``qcompiler validate`` does all.
COMPILE_LAYER_SAMPLES = 8


class Planned(Protocol):
    """What a ``planner`` (the auto planner, for ``--budget``) gives back: the plan to compile, its YAML (written
    beside the model as ``.autoplan.yaml``), a summary for the report, and the budget check of what was written."""

    plan: Plan
    text: str

    def summary(self) -> dict[str, Any]: ...

    def check(self, cost_json: dict[str, Any]) -> None: ...


#: ``planner(base_plan)``: the plan to compile instead of the base plan (``--budget``)
Planner = Callable[[Plan], Planned]


@dataclass
class CompileOptions:
    """Everything ``qcompiler compile`` takes (all optional)."""

    plan: str | Path | Plan | None = None
    target: str = "ort"
    calib: str | Path | None = None  # folder / .npz / "random" / "none"; None: random when needed
    pipeline: str | None = None
    validate: bool | None = None  # None: validate when real calibration data was given
    validate_data: str | Path | None = None  # held-back feeds for validation (defaults to the calib data)
    min_sqnr_db: float | None = None
    verify_each: bool = False
    dump_after: set[str] = field(default_factory=set)
    external_data_threshold: int | None = None
    calib_samples: int | None = None
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


def _preset_plan(name: str) -> str:
    if preset_path(name) is None:
        raise UserError(f"--preset: unknown preset '{name}' (known: {', '.join(preset_names())})")
    return name


#: Where the plan's ``algorithms`` and ``--calib-select`` go in a pipeline, in this order: (pass, anchor, side).
#: After ``fold-batchnorm``: fold-bias (graph normalization the plan must see). After ``resolve-plan`` (BN folded, plan known, nothing calibrated yet): calib-select, equalize, smooth.
#: Before ``insert-qdq`` (ranges calibrated, nothing quantized yet): gptq, then bias-correct (which measures
#: the error of the weights gptq chose).
PIPELINE_INSERTIONS = (
    ("fold-bias", "fold-batchnorm", "after"),
    ("calib-select", "resolve-plan", "after"),
    ("equalize", "resolve-plan", "after"),
    ("smooth", "resolve-plan", "after"),
    ("gptq", "insert-qdq", "before"),
    ("bias-correct", "insert-qdq", "before"),
)


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
            while at < len(passes) and passes[at].name in order[:order.index(name)]:
                at += 1  # after the algorithms that come before this one
        passes.insert(at, reg.get(name)(**wanted[name]))
    return passes


def compile_plan(model_path: str | os.PathLike[str], output_path: str | os.PathLike[str],
                 options: CompileOptions | None = None, progress: Progress | None = None, *,
                 planner: Planner | None = None) -> CompileResult:
    """Compile ``model_path`` to ``output_path``; raises :class:`UserError` for bad input. ``options.budget``
    needs a ``planner`` (:func:`qcompiler.api.compile_model` gives the auto planner). Every step is timed
    (:mod:`qcompiler.core.profile`): ``result.profile``, and ``report["profile"]``."""
    prof = profile.Profile()
    imported = profile.import_seconds()  # the command line's imports (None from Python)
    if imported is not None:
        prof.add("import", imported)
    with prof.active():
        result = _compile_plan(model_path, output_path, options, progress, planner=planner, prof=prof)
    result.profile = prof
    return result


def _compile_plan(model_path: str | os.PathLike[str], output_path: str | os.PathLike[str],
                  options: CompileOptions | None, progress: Progress | None, *, planner: Planner | None,
                  prof: profile.Profile) -> CompileResult:
    opts = options or CompileOptions()
    t_start = time.perf_counter()
    src, out = Path(model_path), Path(output_path)
    if out.resolve() == src.resolve():
        raise UserError(f"{out}: output would overwrite the input model; choose another -o")
    if out.suffix != ".onnx":
        raise UserError(f"{out}: output file must end in .onnx")
    if out.is_dir():
        raise UserError(f"{out}: is a directory; -o needs a file name ending in .onnx")

    with profile.step("setup (passes, target, plan)"):
        reg = registry()
        for spec in opts.plugins:
            reg.load_plugin(spec)
        target = get_target(opts.target)
        if opts.preset is not None and opts.plan is not None:
            raise UserError("--preset and --plan both given; a preset is a plan: give one of them")
        plan = opts.plan if isinstance(opts.plan, Plan) else load_plan(opts.plan if opts.preset is None
                                                                       else _preset_plan(opts.preset))
    target.check_options(plan.target_options, plan.source)  # a bad targets: section fails before any work
    auto = None
    if opts.budget is not None:  # mixed precision under a budget: the plan is planned first (autoplan)
        if planner is None:
            raise ValueError("compile_plan: options.budget needs a planner (qcompiler.api.compile_model)")
        with profile.step("auto plan (--budget)"):
            auto = planner(plan)
        plan = auto.plan
    calib_word = None if opts.calib is None else str(opts.calib)
    if opts.calib_select is not None and (calib_word is None or calib_word in ("random", "none")):
        raise UserError("--calib-select needs a pool of real calibration data to choose from (--calib DIR|FILE.npz)")
    pipeline_text = opts.pipeline if opts.pipeline is not None else target.default_pipeline  # '' is an error
    passes = assemble_pipeline(pipeline_text, plan, reg, calib_select=opts.calib_select)
    if opts.compact_names and not any(p.name == "compact-names" for p in passes):
        passes.append(reg.get("compact-names")())
    pm = PassManager(passes, verify_each=opts.verify_each, dump_after=set(opts.dump_after),
                     dump_dir=out.with_name(out.stem + ".dump") if opts.dump_after else None,
                     on_pass=(lambda name, i, n: progress(f"pass:{name}", i, n)) if progress else None)
    pm.check({"model"})

    with profile.step("load"):
        session = Session.load(src, plan, target)
    float_model = session.model
    for f in sorted(ir.external_files(float_model)):  # the outputs must not replace the input's external data
        if f in {(out.parent / n).resolve() for n in (out.name, out.name + ".data", out.stem + ".plan.yaml")}:
            raise UserError(f"{out}: writing it would overwrite '{f.name}', external data of the input model; "
                            "choose another -o")
    # Refuse a plan the target cannot run before any rewrite (see Session.import_graph), after the opset
    # upgrade the plan needs.
    with profile.step("import graph"):
        graph = session.import_graph(upgrade=True, check=True)
    io_dtypes = session.io_dtypes

    calib_source = None
    calib_arg = None if opts.calib is None else str(opts.calib)
    if calib_arg is not None and calib_arg != "none":
        with profile.step("calibration data"):
            calib_source = CalibrationSource.from_arg(calib_arg, input_signatures(graph), seed=opts.seed,
                                                      limit=opts.calib_samples)
    ctx = session.context(calib=calib_source, output_path=out, seed=opts.seed, data_free=calib_arg == "none")
    if progress is not None:
        ctx.progress = progress
    if opts.strip_function_bodies:
        ctx.options["strip_function_bodies"] = True
    records = pm.run(ctx)
    stripped = bool(ctx.options.get("function_bodies_stripped"))
    if stripped and (opts.validate or opts.validate_data is not None or opts.min_sqnr_db is not None):
        raise UserError("--strip-function-bodies: the custom ops have no function bodies left, so stock "
                        "onnxruntime cannot validate the model; validate a build without the option (same codes)")

    with profile.step("restore io dtypes"):
        ir.restore_io_dtypes(ctx.graph, io_dtypes)
    threshold = opts.external_data_threshold
    if threshold is None and ir.has_external_data(float_model):
        threshold = ir.DEFAULT_EXTERNAL_THRESHOLD  # external data in, external data out
    big = ir.parameter_bytes(float_model) >= ir.NO_PREPACK_BYTES
    # Everything is written into a staging folder beside OUT (model tensor by tensor, external data streamed),
    # checked and validated from there, and moved into place only when the whole compile succeeded.
    with ir.staging(out) as stage:
        staged = stage / out.name
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
        float_bytes = ir.model_summary(float_model)["parameter_bytes"]
        quant_bytes = ir.model_summary(qmodel)["parameter_bytes"]
        report["sizes"] = {"float_parameter_bytes": float_bytes, "quantized_parameter_bytes": quant_bytes,
                           "ratio": round(quant_bytes / float_bytes, 4) if float_bytes else None}
        known = (ctx.calib_shapes or None) if calib_source is not None else None
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

        validation = None
        do_validate = opts.validate if opts.validate is not None else (
            calib_source is not None and not calib_source.synthetic) or opts.validate_data is not None
        if stripped:
            do_validate = False
            report["validation_skipped"] = "function bodies stripped: the model needs native kernels"
        if do_validate:
            if opts.validate_data is not None:
                feeds: Any = qv.load_feeds(opts.validate_data, float_model)
            elif calib_source is not None:
                feeds = list(_limited(calib_source, 64))
            else:
                raise UserError("validation needs data: give --calib DATA or --validate-data FILE.npz")
            if progress:
                progress("validate", 0, 1)
            ir.trim_memory()  # graphs imported for the report above are cycles: unmap their weights first
            # Large models: outputs only (per-layer sessions would hold the float weights twice more).
            with profile.step("validation"):
                validation = qv.validate(float_model, qmodel, feeds, min_sqnr_db=opts.min_sqnr_db,
                                         per_layer=not big,
                                         optimize=True if target.validation_optimization == "all" else "basic",
                                         layer_samples=COMPILE_LAYER_SAMPLES, names=ctx.renamed.get("tensors"),
                                         progress=(lambda d, t: progress("validate", d, t)) if progress else None)
            report["validation"] = validation.to_json()
            if opts.min_sqnr_db is not None and not validation.passed:
                raise UserError(f"validation: output SQNR {validation.worst_output_sqnr():.2f} dB is below "
                                f"--min-sqnr {opts.min_sqnr_db} dB; nothing written")
        elif opts.min_sqnr_db is not None:
            raise UserError("--min-sqnr needs validation data: give --calib DATA or --validate-data FILE.npz")

        with profile.step("side files"):
            for suffix, text in sorted(ctx.side_outputs.items()):
                (stage / (out.stem + suffix)).write_text(text, encoding="utf-8")
        report["seconds"] = round(time.perf_counter() - t_start, 3)
        report["profile"] = prof.to_json()  # up to here; the move into place and the JSON file follow
        files = [out.parent / f.name for f in sorted(stage.iterdir(), key=lambda f: (f.name != out.name, f.name))]
        t_move = time.perf_counter()
    prof.add("move into place", time.perf_counter() - t_move)
    try:
        if opts.report is not None:
            with profile.step("report file"), ir.atomic_output(Path(opts.report)) as tmp:
                tmp.write_text(json.dumps(_jsonable(report), indent=2, sort_keys=True) + "\n", encoding="utf-8")
            files.append(Path(opts.report))
    except BaseException:
        for f in files:
            f.unlink(missing_ok=True)
        raise
    return CompileResult(output=out, files=files, records=records, report=report, validation=validation,
                         pipeline=pm.pipeline_text())


def _limited(source: Any, n: int) -> Any:
    for i, feed in enumerate(source):
        if i >= n:
            break
        yield feed


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
        return str(x)
    if hasattr(x, "item") and callable(x.item):
        return _jsonable(x.item())
    if isinstance(x, Path):
        return str(x)
    return x
