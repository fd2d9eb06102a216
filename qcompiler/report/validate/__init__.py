"""Compare a float model with its quantized version in onnxruntime (CPU), per graph output and per layer.

Both models run on the same feeds. For every graph output, and for every intermediate tensor that both
graphs produce under the same name, error metrics accumulate **streaming** over the samples: only running
sums are kept (Σref², Σq², Σref·q, Σ(ref−q)², Σ|ref−q|, max|ref−q|, element and agreement counts), so
memory does not grow with the number of samples.

* ``sqnr_db`` = 10·log10(Σref² / Σ(ref−q)²) over all samples and elements. Identical tensors give
  ``inf``; a zero reference with a non-zero error gives ``-inf``; NaN anywhere gives ``nan``.
* ``cosine`` = Σref·q / (√Σref² · √Σq²) over the flattened concatenation of all samples (1.0 when both are
  all zero, 0.0 when only one is).
* ``max_abs`` / ``mean_abs``: largest and mean absolute difference.
* ``top1_agreement``: for float tensors that can be class scores — graph outputs of rank 2 or 3 (``[N, C]``
  logits or probabilities, ``[N, T, C]`` sequences) and layers a Softmax / LogSoftmax produced, last dimension
  between 2 and 100 000: the fraction of positions (every index of all axes but the last, over all samples)
  where the argmax over the last axis agrees. ``None`` otherwise (a rank-4 map's last axis is spatial; a
  feature map's or hidden state's argmax is no decision).
* ``worst_slice`` (graph outputs): the slice along the channel / feature axis of lowest SQNR, and
  ``topk_agreement`` for class-score outputs; ``checks``: named output slices with their own thresholds
  (see :mod:`qcompiler.report.validate.slices`).
* ``exact_match``: for integer / bool tensors, the fraction of elements exactly equal (their SQNR is computed
  over the values cast to float). ``None`` for float tensors.

Graph outputs are measured on plain sessions of both models (no intermediate outputs exposed), so
onnxruntime applies the same fusions (e.g. QDQ → integer kernels) as in deployment and a model compared
with itself gives exactly ``inf``. Per-layer metrics come from a second pair of sessions exposing the
intermediate tensors (which may disable some fusions); each sample then runs four times in all (the
exposing sessions' trial run on sample 0 is that sample's result). Comparisons are done in float64 whatever the
model's float type (fp16 models included).

Speed without changing a number (:mod:`~qcompiler.report.validate.pipeline`): the runs of the next samples go to
a pool of ``$QCOMPILER_VALIDATE_WORKERS`` threads (default: the usable CPUs, at most 2) while the current one is
measured, each session with the usable CPUs shared among the runs in flight as intra-op threads; the
per-layer sums run on the pool too, each accumulator taking its samples in order; the float64 copies and
products reuse per-thread scratch buffers. Results are read in a fixed order, so one worker or two give the
same report byte for byte. ``layer_bytes`` (the compile: 2 GiB) bounds the per-layer samples to those whose exposed
tensors fit it — fewer samples, so other per-layer numbers, on a large model only (the ViT: 2 instead of 8).
"""

from qcompiler.report.validate.compare import validate
from qcompiler.report.validate.files import load_feeds, load_names, load_node_names, load_plan_nodes
from qcompiler.report.validate.layers import MAX_LAYERS, QDQ_OPS
from qcompiler.report.validate.metrics import TOP1_MAX_CLASSES, TOP1_MIN_CLASSES, TensorMetrics
from qcompiler.report.validate.reference import (
    Reference,
    StreamSpec,
    compare_outputs,
    float_reference,
    known_outputs,
    validate_against,
)
from qcompiler.report.validate.result import LEGEND, NO_THRESHOLD, LayerInfo, ValidationReport
from qcompiler.report.validate.sessions import ModelLike
from qcompiler.report.validate.slices import CheckResult, SliceMetrics, default_slice_axis

__all__ = ["LEGEND", "MAX_LAYERS", "NO_THRESHOLD", "QDQ_OPS", "TOP1_MAX_CLASSES", "TOP1_MIN_CLASSES", "CheckResult",
           "LayerInfo", "ModelLike", "Reference", "SliceMetrics", "StreamSpec", "TensorMetrics", "ValidationReport",
           "compare_outputs", "default_slice_axis", "float_reference", "known_outputs", "load_feeds", "load_names", "load_node_names", "load_plan_nodes",
           "validate", "validate_against"]
