"""Full-size convnets with random weights, for compile speed and memory on big graphs nobody tuned for.

onnx's wheel ships the BVLC topologies of ``backend/test/data/light`` (ResNet-50, VGG-19, DenseNet-121, ...) with
every weight a ``ConstantOfShape``: the real layer shapes, but constant values (every quantization is exact there,
and GPTQ's Hessians are singular). This writes each one with He-initialised weights instead (Conv / Gemm weights
``N(0, 2 / fan_in)``, BatchNormalization scale ``1 + 0.1 N``, bias and mean ``0.1 N``, variance ``1 + 0.2 U``, other
constants ``0.01 N``; seed 0), the opset raised to 13, and the last Gemm scaled so its logits have a standard
deviation of 3 on the first photo (a softmax that is not saturated). Inputs: square crops of the benchmark photos
at 224 x 224, ImageNet mean / std (``tests/realdata.py``'s ``vit_focus_inputs``), ``calib`` and ``eval`` splits.
Numbers on these models say how the compile scales (seconds, peak RSS) and whether the quantized graph follows
the float one (SQNR); they say nothing about task accuracy::

    python benchmarks/light_models.py resnet50 vgg19 --out /tmp/light --calib 64 --eval 16
    python benchmarks/compare_ort.py /tmp/light/resnet50.onnx --mode speed --repeat 1 \\
        --calib-data /tmp/light/resnet50-calib --eval-data /tmp/light/resnet50-eval --ort-methods MinMax

benchmarks/RESULTS.md, "Session 23", has the measurements.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import realdata
from _common import session, write_feeds

LIGHT = Path(os.path.dirname(onnx.__file__)) / "backend" / "test" / "data" / "light"
NAMES = ("resnet50", "vgg19", "densenet121", "inception_v1", "inception_v2", "squeezenet", "shufflenet",
         "bvlc_alexnet", "zfnet512")


def random_weights(name: str) -> onnx.ModelProto:
    """``light_<name>.onnx`` at opset 13 with every ``ConstantOfShape`` a random initializer (module docstring)."""
    m = onnx.version_converter.convert_version(onnx.load(LIGHT / f"light_{name}.onnx"), 13)
    g = m.graph
    shapes = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    readers: dict[str, tuple[str, int]] = {}
    for n in g.node:
        for k, x in enumerate(n.input):
            readers.setdefault(x, (n.op_type, k))
    rng = np.random.default_rng(0)
    kept, made = [], []
    for n in g.node:
        if n.op_type != "ConstantOfShape":
            kept.append(n)
            continue
        shape = tuple(int(v) for v in shapes[n.input[0]])
        op, k = readers[n.output[0]]
        if op in ("Conv", "Gemm") and k == 1:
            v = rng.standard_normal(shape) * np.sqrt(2.0 / int(np.prod(shape[1:])))
        elif op == "BatchNormalization":
            v = {1: 1 + 0.1 * rng.standard_normal(shape), 2: 0.1 * rng.standard_normal(shape),
                 3: 0.1 * rng.standard_normal(shape), 4: 1 + 0.2 * rng.random(shape)}[k]
        else:
            v = 0.01 * rng.standard_normal(shape)
        made.append(numpy_helper.from_array(v.astype(np.float32), n.output[0]))
    del g.node[:]
    g.node.extend(kept)
    used = {x for n in kept for x in n.input}
    old = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(old + made)
    names = {i.name for i in g.initializer}
    inputs = [i for i in g.input if i.name not in names and i.name not in shapes]
    del g.input[:]
    g.input.extend(inputs)
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _scale_head(m: onnx.ModelProto, feed: dict[str, np.ndarray]) -> None:
    """Scale the last Gemm's weight and bias so its logits have a standard deviation of 3 on ``feed``."""
    gemm = [n for n in m.graph.node if n.op_type == "Gemm"]
    if not gemm:
        return
    probe = onnx.ModelProto()
    probe.CopyFrom(m)
    probe.graph.output.append(onnx.helper.make_tensor_value_info(gemm[-1].output[0], onnx.TensorProto.FLOAT, None))
    logits = session(probe.SerializeToString()).run([gemm[-1].output[0]], feed)[0]
    k = 3.0 / float(np.std(logits))
    for i in m.graph.initializer:
        if i.name in gemm[-1].input[1:]:
            i.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(i) * k).astype(np.float32), i.name))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="+", choices=NAMES)
    ap.add_argument("--out", required=True, help="folder for NAME.onnx, NAME-calib/, NAME-eval/")
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--eval", type=int, default=16)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.names:
        m = random_weights(name)
        x = m.graph.input[0].name
        split = {s: [{x: f["input_image"]} for f in realdata.vit_focus_inputs(n, s)]
                 for s, n in (("calib", args.calib), ("eval", args.eval))}
        _scale_head(m, split["calib"][0])
        onnx.save(m, out / f"{name}.onnx")
        for s, feeds in split.items():
            write_feeds(feeds, out / f"{name}-{s}")
        print(f"{out / (name + '.onnx')}: {sum(i.ByteSize() for i in m.graph.initializer) / 1e6:.1f} MB of weights, "
              f"input {x}; {args.calib} calib / {args.eval} eval photos")
    return 0


if __name__ == "__main__":
    sys.exit(main())
