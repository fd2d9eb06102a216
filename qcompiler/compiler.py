"""The Python API: ``compile_model(MODEL, OUT, CompileOptions(...))``.

Steps: load (checked, never modified) → parse the plan and pipeline, check the pipeline and the plan against
the target before any rewrite → upgrade the opset when the plan needs it → import into graphsurgeon (fp16
models computed in fp32) → run the passes → restore the fp16 interface → validate in onnxruntime against the
float model (when calibration data was given) → write the model and its side files atomically.
A run that fails (including a failed ``min_sqnr_db`` gate) writes nothing.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from qcompiler import ir
from qcompiler.context import CompileContext
from qcompiler.errors import UserError
from qcompiler.pass_manager import PassManager, PassRecord
from qcompiler.plan import Plan, _make_spec, load_plan, required_opset
from qcompiler.registry import build_pipeline, registry
from qcompiler.runtime_targets import get_target

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]


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
    seed: int = 0
    plugins: list[str] = field(default_factory=list)
    report: str | Path | None = None


@dataclass
class CompileResult:
    output: Path
    files: list[Path]
    records: list[PassRecord]
    report: dict[str, Any]
    validation: Any = None
    pipeline: str = ""


def _plan_specs(plan: Plan) -> list[Any]:
    specs = [_make_spec(plan.weight_defaults, "defaults.weight"), _make_spec(plan.activation_defaults,
                                                                             "defaults.activation")]
    for r in plan.rules:
        if r.skip:
            continue
        specs.append(_make_spec({**plan.weight_defaults, **r.weight}, r.describe()))
        specs.append(_make_spec({**plan.activation_defaults, **r.activation}, r.describe()))
    return [s for s in specs if not s.is_float]


def compile_model(model_path: str | os.PathLike[str], output_path: str | os.PathLike[str],
                  options: CompileOptions | None = None, progress: Progress | None = None) -> CompileResult:
    """Compile ``model_path`` to ``output_path``; raises :class:`UserError` for bad input."""
    opts = options or CompileOptions()
    t_start = time.perf_counter()
    src, out = Path(model_path), Path(output_path)
    if out.resolve() == src.resolve():
        raise UserError(f"{out}: output would overwrite the input model; choose another -o")
    if out.suffix != ".onnx":
        raise UserError(f"{out}: output file must end in .onnx")

    reg = registry()
    for spec in opts.plugins:
        reg.load_plugin(spec)
    target = get_target(opts.target)
    plan = opts.plan if isinstance(opts.plan, Plan) else load_plan(opts.plan)
    passes = build_pipeline(opts.pipeline or target.default_pipeline, reg)
    pm = PassManager(passes, verify_each=opts.verify_each, dump_after=set(opts.dump_after),
                     dump_dir=out.with_name(out.stem + ".dump") if opts.dump_after else None,
                     on_pass=(lambda name, i, n: progress(f"pass:{name}", i, n)) if progress else None)
    pm.check({"model"})

    model = ir.load_model(src)
    float_model = model
    # Refuse a plan the target cannot run before any rewrite (node names are those of the input model).
    graph0, _ = ir.import_graph(model, str(src))
    target.check(plan.resolve(graph0))
    del graph0

    need, why = required_opset(_plan_specs(plan))
    if ir.opset_of(model) < need:
        model = ir.upgrade_opset(model, need, why)
    graph, meta = ir.import_graph(model, str(src))
    io_dtypes = ir.to_float32(graph)
    meta.io_dtypes = io_dtypes

    calib_source = None
    calib_arg = None if opts.calib is None else str(opts.calib)
    if calib_arg is not None and calib_arg != "none":
        from qcompiler.calibration import CalibrationSource, input_signatures

        calib_source = CalibrationSource.from_arg(calib_arg, input_signatures(graph), seed=opts.seed,
                                                  limit=opts.calib_samples)
    ctx = CompileContext(graph=graph, meta=meta, plan=plan, target=target, calib=calib_source,
                         output_path=out, seed=opts.seed)
    if progress is not None:
        ctx.report["_progress"] = progress
    records = pm.run(ctx)
    ctx.report.pop("_progress", None)

    ir.restore_io_dtypes(ctx.graph, io_dtypes)
    qmodel = ir.export_model(ctx.graph, meta)
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

    validation = None
    do_validate = opts.validate if opts.validate is not None else (
        calib_source is not None and not calib_source.synthetic) or opts.validate_data is not None
    if do_validate:
        from qcompiler import validate as qv

        if opts.validate_data is not None:
            feeds: Any = qv.load_feeds(opts.validate_data, float_model)
        elif calib_source is not None:
            feeds = list(_limited(calib_source, 64))
        else:
            raise UserError("validation needs data: give --calib DATA or --validate-data FILE.npz")
        if progress:
            progress("validate", 0, 1)
        validation = qv.validate(float_model, qmodel, feeds, min_sqnr_db=opts.min_sqnr_db)
        report["validation"] = validation.to_json()
        if opts.min_sqnr_db is not None and not validation.passed:
            raise UserError(f"validation: output SQNR {validation.worst_output_sqnr():.2f} dB is below "
                            f"--min-sqnr {opts.min_sqnr_db} dB; nothing written")
    elif opts.min_sqnr_db is not None:
        raise UserError("--min-sqnr needs validation data: give --calib DATA or --validate-data FILE.npz")

    report["seconds"] = round(time.perf_counter() - t_start, 3)
    files = ir.save_model(qmodel, out, external_data_threshold=opts.external_data_threshold)
    try:
        for suffix, text in sorted(ctx.side_outputs.items()):
            side = out.with_name(out.stem + suffix)
            with ir.atomic_output(side) as tmp:
                tmp.write_text(text, encoding="utf-8")
            files.append(side)
        if opts.report is not None:
            with ir.atomic_output(Path(opts.report)) as tmp:
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


def load_for_inspect(path: str | os.PathLike[str]) -> onnx.ModelProto:
    return ir.load_model(path)
