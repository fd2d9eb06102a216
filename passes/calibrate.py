"""calibrate: measure the range of every activation tensor to quantize (an analysis; the graph is unchanged).

Runs the float graph in onnxruntime over the calibration samples (``ctx.calib``: a folder of .npz feeds, one
.npz with a leading sample axis, or random data) with the tensors of ``ctx.activation_specs`` exposed as extra
outputs, one sample at a time, and stores a :class:`~qcompiler.calibration.TensorStats` per tensor in
``ctx.stats``. The quantizer later asks each for ``stats.range(spec)`` (minmax, percentile, entropy or mse).

Without calibration data (``ctx.calib is None``) it uses seeded random inputs and says so: the report's
``calibration.synthetic`` is true and a warning is logged, because such ranges are only a placeholder.

Data-free mode (``--calib none``, ``ctx.data_free``): a tensor computed from a BatchNormalization output by
elementwise ops only (ReLU, Clip, hard-swish, ..., see ``qcompiler.calibration.bn_ranges``) gets its range from
the BN statistics ``fold-batchnorm`` recorded: per channel ``β ± k·γ`` (k = ``BN_SIGMAS``, 6) pushed through those
ops, so a ReLU clips it at 0. The other tensors (the graph inputs, for one) fall back to random inputs.

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

import numpy as np

from qcompiler.calibration import (
    BN_SIGMAS,
    CalibrationSource,
    TensorStats,
    bn_ranges,
    bn_statistics,
    collect,
    input_signatures,
)
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

        fixed: dict[str, tuple[float, float]] = {}
        if ctx.data_free:  # --calib none: ranges from the recorded BatchNormalization statistics where possible
            fixed = bn_ranges(ctx.graph, list(specs), bn_statistics(ctx), BN_SIGMAS)
            for name in fixed:
                specs[name] = dataclasses.replace(specs[name], calibration="minmax")
                ctx.activation_specs[name] = specs[name]
        rest = {name: spec for name, spec in specs.items() if name not in fixed}

        source: CalibrationSource
        if ctx.calib is None:
            n = opts.samples or DEFAULT_RANDOM_SAMPLES
            source = CalibrationSource.from_arg("random", input_signatures(ctx.graph), seed=ctx.seed,
                                                num_random=n)
            if rest:
                log.warning("no calibration data: using %s for %d tensor(s); their activation ranges are "
                            "synthetic (give --calib DATA)", source.description, len(rest))
        else:
            source = ctx.calib.take(opts.samples)
        n_samples = len(source) if rest else 0
        progress = self._progress(ctx, n_samples)
        shapes: dict[str, Any] = {}
        ctx.stats = collect(ctx.graph, rest, source, progress=progress, shapes=shapes) if rest else {}
        if shapes:  # first-sample shapes: the compile's cost report infers the rest instead of running the model
            ctx.calib_shapes = shapes
        for name, (lo, hi) in fixed.items():
            st = TensorStats()
            st.update(np.asarray([lo, hi], dtype=np.float64))
            ctx.stats[name] = st
        if ctx.data_free:
            ctx.report["data_free"] = {"bn_ranges": len(fixed), "synthetic_ranges": len(rest),
                                       "bn_sigmas": BN_SIGMAS}
            stats["bn_ranges"] = len(fixed)
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
        if source.synthetic and rest:
            stats["synthetic"] = 1
        return PassResult(modified=False, stats=stats)
