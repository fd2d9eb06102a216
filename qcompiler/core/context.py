"""The state a pipeline of passes works on."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx_graphsurgeon as gs

from qcompiler.core.activations import ActivationCache
from qcompiler.core.model_io import ModelIO, installed

if TYPE_CHECKING:
    from qcompiler.calib import CalibrationSource, TensorStats
    from qcompiler.ir import ModelMeta
    from qcompiler.plan import Plan, QuantSpec, ResolvedPlan
    from qcompiler.quant import QuantizedTensor
    from qcompiler.runtime_targets import Target


@dataclass
class CompileContext:
    """Everything a pass may read or change.

    * ``graph``: the graphsurgeon graph being rewritten (fp32 math even for fp16 models).
    * ``meta``: model-level facts (opset, ir_version, fp16 interface) restored on export.
    * ``plan`` / ``resolved``: the precision plan and, after ``resolve-plan``, the decision per node.
    * ``activation_specs``: tensor name -> activation :class:`QuantSpec` the graph will quantize
      (filled by ``resolve-plan``; the target may add outputs it needs for its integer kernels).
    * ``stats``: tensor name -> calibration statistics (filled by ``calibrate``).
    * ``calib``: where calibration samples come from (``None``: data-free / random).
    * ``properties``: what has been established so far (``"bn-folded"``, ``"plan-resolved"``, ...).
    * ``report``: free-form facts passes want to show the user (JSON-serializable).
    * ``activation_all_consumers``: of those, tensors whose every consumer reads the dequantized value
      (outputs quantized for a target's integer kernel); the others rewire only their quantized consumers.
    * ``output_path``: the model file being produced; side files derive their names from it.
    * ``side_outputs``: suffix -> text of side files (``.plan.yaml``) the driver writes beside the output,
      atomically and only when the whole compile succeeds.
    * ``weight_overrides``: (node name, input index) -> an already quantized weight (e.g. from ``gptq``) that
      ``insert-qdq`` must emit as is instead of rounding the float weight itself.
    * ``options``: free-form compile-wide settings of plug-ins (the built-ins use the typed fields below).
    * ``require_calibration_data``: no calibration data was given at all (no ``--calib``): ``calibrate`` refuses
      static activation ranges instead of measuring them on random inputs (``--calib random`` asks for those).
    * ``strip_function_bodies``: ``--strip-function-bodies`` — custom-domain lowerings leave out the ONNX function
      bodies; ``function_bodies_stripped``: a lowering did so (the driver then cannot validate in onnxruntime).
    * ``passes_after``: the names of the passes still to run after the current one (set by the pass manager
      before each pass; e.g. ``calibrate`` warns when a pass whose effect it does not measure follows).
    * ``progress``: ``(what, done, total)`` callback for long passes (``calibrate`` reports its sample runs),
      set by the driver; ``None``: no progress reporting.
    * ``bias_corrected``: names of the nodes whose bias ``bias-correct`` already shifted (a second run skips
      them).
    * ``activations``: float activations by calibration sample that ``calibrate`` captured for the PTQ passes
      streaming the same samples after it (:class:`~qcompiler.core.activations.ActivationCache`, bounded in
      bytes; a rewrite of the graph makes its entries miss).
    * ``model_io``: how to export / check / save the graph as a model (``None``: the process-wide one the IR
      layer installed, see :mod:`qcompiler.core.model_io`).
    * ``data_free``: ``--calib none`` — activation ranges must come from the model itself (BN statistics).
    * ``bn_stats``: tensor name -> per-channel statistics (``calibration.ChannelStats``) of BatchNormalization
      outputs, recorded by ``fold-batchnorm`` before the BN disappears (data-free ranges, ``equalize``'s bias
      absorption, analytic bias correction read them).
    * ``calib_shapes``: tensor name -> (shape, dtype) the calibrate pass saw on its first sample; the compile's
      cost report sizes tensors from them instead of running the model again.
    * ``float_outputs``: where ``calibrate`` puts the float graph's outputs on the first calibration samples
      (:class:`~qcompiler.calib.shared.FloatOutputs`, set by the compile driver when its validation runs on those
      samples: they are its float reference there); ``None``: not wanted.
    * ``renamed``: ``{"tensors": {new: old}, "nodes": {new: old}}`` once ``compact-names`` has shortened the
      names (old: the names before it); validation and the cost report map names back through it.
    * ``exact_weights``: dequantized weight tensor (``W'``) -> the float weight it stands for, recorded by
      ``insert-qdq{exact-weights=true}``; ``exact-weights`` (last) rewires ``W'``'s readers to the float values.
    * ``collect_for_auto``: ``calibrate`` collects histograms in the two parts a later ``calibration: auto`` over
      the same graph and samples reads (``collect(..., for_auto=True)``; the same statistics returned), so that
      such a compile in this process is served from the statistics cache (``CompileOptions.collect_for_auto``:
      the measured default's plain default plan candidate).
    """

    graph: gs.Graph
    meta: ModelMeta
    plan: Plan
    target: Target
    calib: CalibrationSource | None = None
    resolved: ResolvedPlan | None = None
    activation_specs: dict[str, QuantSpec] = field(default_factory=dict)
    activation_all_consumers: set[str] = field(default_factory=set)
    stats: dict[str, TensorStats] = field(default_factory=dict)
    properties: set[str] = field(default_factory=lambda: {"model"})
    report: dict[str, Any] = field(default_factory=dict)
    output_path: Path | None = None
    side_outputs: dict[str, str] = field(default_factory=dict)
    weight_overrides: dict[tuple[str, int], QuantizedTensor] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    require_calibration_data: bool = False
    strip_function_bodies: bool = False
    function_bodies_stripped: bool = False
    data_free: bool = False
    seed: int = 0
    bn_stats: dict[str, Any] = field(default_factory=dict)
    calib_shapes: dict[str, Any] = field(default_factory=dict)
    float_outputs: Any = None
    renamed: dict[str, dict[str, str]] = field(default_factory=dict)
    exact_weights: dict[str, Any] = field(default_factory=dict)
    passes_after: tuple[str, ...] = ()
    progress: Callable[[str, int, int], None] | None = None
    bias_corrected: set[str] = field(default_factory=set)
    collect_for_auto: bool = False
    model_io: ModelIO | None = None
    activations: ActivationCache = field(default_factory=ActivationCache)

    @property
    def opset(self) -> int:
        return int(self.graph.opset)

    def side_file(self, suffix: str) -> Path | None:
        """``OUT.onnx`` + ``.plan.yaml`` -> ``OUT.plan.yaml`` (``None`` when there is no output path)."""
        if self.output_path is None:
            return None
        return self.output_path.with_name(self.output_path.stem + suffix)

    def export(self) -> Any:
        """The current graph as a model (a ModelProto, for sessions and dumps), through :attr:`model_io`."""
        return (self.model_io or installed()).export(self.graph, self.meta)
