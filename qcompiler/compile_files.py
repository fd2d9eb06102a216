"""The files a compile reads and writes: every input (model, plan, calibration and validation data, plugins)
and every output (the model, its side files, ``--report``, ``--recipe-out``, the ``--dump-after`` folder) in one
:class:`~qcompiler.ir.OutputSet`, checked against each other before any work and committed together; and the
report of a model the validation gate refused, written under the same policy.

Part of the compile driver (:mod:`qcompiler.compile`); the options are read structurally (:class:`CompileFiles`),
so this module does not import the driver.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from qcompiler import ir
from qcompiler.core.numbers import json_tree
from qcompiler.plan import Plan


class CompileFiles(Protocol):
    """What of :class:`~qcompiler.compile.CompileOptions` decides the files a compile touches."""

    plan: Any
    calib: Any
    validate_data: Any
    plugins: Any
    budget: Any
    recipe_out: Any
    report: Any
    dump_after: Any
    specialized: Any


SIDE_FILES = {".onnx.data": "the output's external data", ".plan.yaml": "the resolved-plan side file",
              ".names.json": "the --compact-names side file", ".autoplan.yaml": "the --budget plan side file"}


def _side_role(suffix: str) -> str:
    return SIDE_FILES.get(suffix, f"the side file '{suffix}'")


def compile_outputs(src: Path, out: Path, opts: CompileFiles) -> ir.OutputSet:
    """The inputs a compile of ``src`` to ``out`` reads and every path it may write (not yet checked: enter
    the returned :class:`~qcompiler.ir.OutputSet` to check them and create the staging folders)."""
    outs = _compile_inputs(src, opts)
    outs.add_output(out, "output", primary=True)
    for suffix in SIDE_FILES:
        if suffix != ".autoplan.yaml" or opts.budget is not None:
            outs.add_output(out.with_name(out.stem + suffix), _side_role(suffix))
    if opts.recipe_out is not None:
        outs.add_output(opts.recipe_out, "--recipe-out")
    if opts.report is not None:
        outs.add_output(opts.report, "--report")
    if opts.dump_after:
        outs.add_output(_dump_dir(out), "--dump-after folder", directory=True, in_place=True)
    return outs


def _compile_inputs(src: Path, opts: CompileFiles) -> ir.OutputSet:
    """An output set holding every file a compile of ``src`` reads (no outputs yet)."""
    outs = ir.OutputSet()
    outs.add_input(src, "model", model=True)
    if opts.specialized is not None:  # the model a specialized one was written from (qcompiler.api)
        outs.add_input(opts.specialized["model"], "model", model=True)
    plan = opts.plan.source if isinstance(opts.plan, Plan) else opts.plan
    if plan is not None and Path(str(plan)).is_file():
        outs.add_input(str(plan), "plan")
    if opts.calib is not None and str(opts.calib) not in ("random", "none"):
        outs.add_input(opts.calib, "calibration data")
    outs.add_input(opts.validate_data, "validation data")
    for spec in opts.plugins:
        if Path(spec).is_file():
            outs.add_input(spec, "plugin")
    return outs


def _dump_dir(out: Path) -> Path:
    return out.with_name(out.stem + ".dump")



def _write_rejected_report(report: dict[str, Any], src: Path, opts: CompileFiles, path: Path) -> Path:
    """The compile report of a model refused by the ``--min-sqnr`` gate, written (atomically) at ``path`` under
    the same output-path policy as the compile's own outputs (never over one of its inputs)."""
    failure = report.get("validation", {}).get("failure") or ""
    reason = "output SQNR below --min-sqnr" if "--min-sqnr" in failure else "a validation check failed"
    rep = {**report, "rejected": f"{reason}: the model was not written ({failure})"}
    outs = _compile_inputs(src, opts)
    outs.add_output(path, "rejected-model report")
    with outs:
        outs.path(path).write_text(json.dumps(json_tree(rep), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        outs.commit()
    return path

