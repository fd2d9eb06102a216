"""calibrate: measure the range of every activation tensor to quantize (an analysis; the graph is unchanged).

Runs the float graph in onnxruntime over the calibration samples (``ctx.calib``: a folder of .npz feeds, one
.npz with a leading sample axis, or random data) with the tensors of ``ctx.activation_specs`` exposed as extra
outputs, one sample at a time, and stores a :class:`~qcompiler.calibration.TensorStats` per tensor in
``ctx.stats``. The quantizer later asks each for ``stats.range(spec)`` (minmax, percentile, entropy or mse).

Without calibration data (``ctx.calib is None``) it uses seeded random inputs and says so: the report's
``calibration.synthetic`` is true and a warning is logged, because such ranges are only a placeholder.

Options: ``method`` overrides every activation spec's calibration method (written back into
``ctx.activation_specs`` so the quantizer uses the same one), ``percentile`` overrides the percentile, and
``samples`` uses at most N samples.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qcompiler.calibration import CalibrationSource, collect, input_signatures
from qcompiler.context import CompileContext
from qcompiler.errors import UserError
from qcompiler.pass_base import Pass, PassResult
from qcompiler.plan import CALIBRATIONS

log = logging.getLogger(__name__)

#: Random samples used when no calibration data is given (and ``samples`` is not set).
DEFAULT_RANDOM_SAMPLES = 16


@dataclass
class Options:
    method: str | None = None  # override every activation spec's calibration: minmax|percentile|entropy|mse
    percentile: float | None = None  # override the percentile (50, 100]
    samples: int | None = None  # use at most N samples

    def validate(self, pass_name: str = "calibrate") -> None:
        if self.method is not None and self.method not in CALIBRATIONS:
            raise UserError(f"pass '{pass_name}' option 'method': bad value '{self.method}' "
                            f"(one of: {', '.join(CALIBRATIONS)})")
        if self.percentile is not None and not (50.0 < float(self.percentile) <= 100.0):
            raise UserError(f"pass '{pass_name}' option 'percentile': must be in (50, 100], got {self.percentile}")
        if self.samples is not None and self.samples <= 0:
            raise UserError(f"pass '{pass_name}' option 'samples': must be a positive integer, got {self.samples}")


class CalibratePass(Pass):
    """Collect activation statistics over the calibration data (random when none is given)."""

    name = "calibrate"
    Options = Options
    requires = frozenset({"plan-resolved"})
    produces = frozenset({"calibrated"})

    #: Set by the CLI: called with the number of sample runs, returns a ``progress(done, total)`` callback.
    progress_factory: Callable[[int], Callable[[int, int], None]] | None = None

    def __init__(self, options: Any = None, **kwargs: Any) -> None:
        super().__init__(options, **kwargs)
        self.options.validate(self.name)

    def _progress(self, ctx: CompileContext, total: int) -> Callable[[int, int], None] | None:
        if self.progress_factory is not None:
            return self.progress_factory(total)
        report_cb = ctx.report.get("_progress")
        if callable(report_cb):
            return lambda done, n: report_cb("calibrate", done, n)
        return None

    def run(self, ctx: CompileContext) -> PassResult:
        opts: Options = self.options
        stats: Counter[str] = Counter()
        specs = dict(ctx.activation_specs)
        overrides: dict[str, Any] = {}
        if opts.method is not None:
            overrides["calibration"] = opts.method
        if opts.percentile is not None:
            overrides["percentile"] = float(opts.percentile)
        if overrides:
            specs = {name: dataclasses.replace(spec, **overrides) for name, spec in specs.items()}
            ctx.activation_specs = dict(specs)  # the quantizer must ask for the range we calibrated for
        if not specs:
            ctx.stats = {}
            ctx.report["calibration"] = {"source": None, "synthetic": False, "samples": 0, "tensors": 0,
                                         "methods": {}}
            stats["tensors"] = 0
            stats["samples"] = 0
            return PassResult(modified=False, stats=stats)

        source: CalibrationSource
        if ctx.calib is None:
            n = opts.samples or DEFAULT_RANDOM_SAMPLES
            source = CalibrationSource.from_arg("random", input_signatures(ctx.graph), seed=ctx.seed,
                                                num_random=n)
            log.warning("no calibration data: using %s; activation ranges are synthetic (give --calib DATA)",
                        source.description)
        else:
            source = ctx.calib.take(opts.samples)
        n_samples = len(source)
        progress = self._progress(ctx, n_samples)
        ctx.stats = collect(ctx.graph, specs, source, progress=progress)
        methods = Counter(spec.calibration for spec in specs.values())
        ctx.report["calibration"] = {
            "source": source.description,
            "synthetic": bool(source.synthetic),
            "samples": n_samples,
            "tensors": len(ctx.stats),
            "methods": dict(sorted(methods.items())),
        }
        stats["tensors"] = len(ctx.stats)
        stats["samples"] = n_samples
        if source.synthetic:
            stats["synthetic"] = 1
        return PassResult(modified=False, stats=stats)
