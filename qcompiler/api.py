"""The Python API: ``compile_model(MODEL, OUT, CompileOptions(...))``.

Steps: load (checked, never modified) → parse the plan and pipeline, check the pipeline and the plan against
the target before any rewrite → plan mixed precision first under ``budget`` (:mod:`qcompiler.autoplan`) →
upgrade the opset when the plan needs it → import into graphsurgeon (fp16 models computed in fp32) → run the
passes → restore the fp16 interface → validate in onnxruntime against the float model (when calibration data
was given) → write the model and its side files atomically. A run that fails (including a failed
``min_sqnr_db`` gate) writes nothing. The driver is :mod:`qcompiler.compile`; this module is the façade.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qcompiler import autoplan, recipe
from qcompiler.compile import (
    AUTO_PLAN,
    COMPILE_LAYER_SAMPLES,
    PIPELINE_INSERTIONS,
    REJECTED_REPORT_SUFFIX,
    CompileOptions,
    CompileResult,
    Progress,
    assemble_pipeline,
    compile_plan,
)
from qcompiler.plan import Plan
from qcompiler.report.bundle import CHECK_SAMPLES, BundleResult, package_model

log = logging.getLogger("qcompiler")

__all__ = ["COMPILE_LAYER_SAMPLES", "PIPELINE_INSERTIONS", "REJECTED_REPORT_SUFFIX", "CompileOptions", "CompileResult", "Progress",
           "assemble_pipeline", "build_bundle", "compile_model", "specialize_model"]


def compile_model(model_path: str | os.PathLike[str], output_path: str | os.PathLike[str],
                  options: CompileOptions | None = None, progress: Progress | None = None) -> CompileResult:
    """Compile ``model_path`` to ``output_path``; raises :class:`UserError` for bad input. With no plan, preset
    or budget and real calibration data (at least 4 samples), the measured default chooses the recipe
    (:mod:`qcompiler.recipe`; ``plan="default"`` compiles the plain default plan instead), as ``plan="auto"``
    does. With ``options.budget``, the plan is planned first (:func:`qcompiler.autoplan.plan_for_compile`)."""
    opts = options or CompileOptions()
    # the auto planner (a budget, not the measured default's constraint) measures the file it is given
    if opts.budget is not None and opts.plan != AUTO_PLAN and (opts.freeze_inputs or opts.input_shapes):
        return _specialized_then_planned(Path(model_path), Path(output_path), opts, progress)

    def planner(base: Plan) -> autoplan.AutoPlanResult:
        return autoplan.plan_for_compile(Path(model_path), opts, base, progress)

    def measured(base: Plan, resolved: CompileOptions) -> recipe.RecipeResult:
        return recipe.plan_for_compile(Path(model_path), resolved, base, progress)

    return compile_plan(model_path, output_path, opts, progress, planner=planner, recipe=measured)


def specialize_model(src: Path, dest: Path, freeze_inputs: Sequence[str] = (), input_shapes: Sequence[str] = (), *,
                     target: str = "ort", plugins: Sequence[str] = (), progress: Progress | None = None) -> str:
    """Write ``src`` specialized at ``freeze_inputs`` (``NAME=VALUE``) and ``input_shapes`` (``NAME=D0,D1,...``)
    to ``dest``: ``freeze-inputs``, ``fix-shapes`` and cleanup only — the float model at those inputs, its Ifs on
    them inlined, nothing quantized (what the planner measures for ``--budget`` / ``plan --budget`` with those
    flags; ``compile ... --pipeline cleanup`` by hand). Returns the pipeline text that ran."""
    res = compile_plan(src, dest, CompileOptions(pipeline="cleanup", freeze_inputs=tuple(freeze_inputs),
                                                 input_shapes=tuple(input_shapes), validate=False, target=target,
                                                 plugins=list(plugins)), progress)
    return res.pipeline


def _specialized_then_planned(src: Path, out: Path, opts: CompileOptions, progress: Progress | None) -> CompileResult:
    """``budget`` with ``freeze_inputs`` / ``input_shapes``: the planner measures the model file it is given, so
    the model is specialized first — ``freeze-inputs``, ``fix-shapes`` and ``cleanup`` only, the float model at
    those inputs (its Ifs on them inlined), written into a temporary folder — and that file is compiled under the
    budget (validated against it: the same function at those inputs). The original stays an input of that compile
    (every output is checked against it and its external data). Doing the two steps by hand — ``compile MODEL -o
    SPECIAL.onnx --freeze-input ... --input-shape ... --pipeline cleanup``, then ``compile SPECIAL.onnx --budget
    ...`` — writes the same bytes."""
    with tempfile.TemporaryDirectory(prefix="qcompiler-specialized-") as tmp:
        special = Path(tmp) / src.name
        pipeline = specialize_model(src, special, opts.freeze_inputs, opts.input_shapes, target=opts.target,
                                    plugins=opts.plugins, progress=progress)
        log.info("--budget: planning %s specialized first (%s)", src, pipeline)
        done = {"model": str(src), "pipeline": pipeline, "freeze_inputs": list(opts.freeze_inputs),
                "input_shapes": list(opts.input_shapes)}
        return compile_model(special, out, dataclasses.replace(
            opts, freeze_inputs=(), input_shapes=(), specialized=done), progress)


def build_bundle(model: str | os.PathLike[str], bundle: str | os.PathLike[str], *, target: str = "ort",
                 calib: str | os.PathLike[str], plan: Any = None, pipeline: str | None = None,
                 min_sqnr_db: float | None = None, make_zip: bool = False, validate_data: Any = None,
                 calib_samples: int | None = None, seed: int = 0, external_data_threshold: int | None = None,
                 plugins: Sequence[str] = (), check_samples: int = CHECK_SAMPLES,
                 progress: Any = None, compact_names: bool = False, checks: Sequence[Any] = (),
                 slice_axes: dict[str, int] | None = None) -> BundleResult:
    """Compile ``model`` (validated against real data) and write a deployment bundle at ``bundle``."""
    def compile_into(src: Path, dest: Path) -> Any:
        opts = CompileOptions(plan=plan, target=target, calib=str(calib), pipeline=pipeline, validate=True,
                              validate_data=validate_data, min_sqnr_db=min_sqnr_db,
                              external_data_threshold=external_data_threshold, calib_samples=calib_samples,
                              seed=seed, plugins=list(plugins), compact_names=compact_names,
                              checks=list(checks), slice_axes=dict(slice_axes or {}),
                              rejected_report=Path(bundle).with_name(Path(bundle).name + REJECTED_REPORT_SUFFIX))
        return compile_model(src, dest, opts, progress=progress)

    return package_model(model, bundle, compile_into, calib=calib, plan=plan, min_sqnr_db=min_sqnr_db,
                         make_zip=make_zip, validate_data=validate_data, check_samples=check_samples,
                         inputs=[(p, "plugin") for p in plugins if Path(p).is_file()])
