#!/usr/bin/env python
"""Generate the small ONNX fixtures used by qcompiler's tests.

Every fixture is a float model (opset 17 unless stated) with realistic weights and a sample file
``X.npz`` holding 32 inputs per graph input, stacked on a leading sample axis with feed batch 1
(e.g. ``input`` of shape [32, 1, 3, 32, 32]).

BatchNormalization running statistics are *measured* on the sample inputs (then perturbed a little),
so the models behave like trained networks: activations are well scaled, ReLUs are neither dead nor
always on, and folding BN into the preceding Conv/Gemm changes the weights substantially.

The script is deterministic: fixed seeds, single-threaded onnxruntime for the statistics (rounded),
and zip entries with a fixed timestamp.  Running it twice gives byte-identical files.

    python models/make_fixtures.py [--out DIR]
"""

from __future__ import annotations

import argparse
import io
import math
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

N_SAMPLES = 32
OPSET = 17
IR_VERSION = 8
F32 = TensorProto.FLOAT
F16 = TensorProto.FLOAT16

# graph inputs that are weights (no batch dim): their samples are [S, *weight_shape]
WEIGHT_INPUTS = {"dyn_weight"}

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


# --------------------------------------------------------------------------------------------------
# sample data
# --------------------------------------------------------------------------------------------------


def _lowpass(rng: np.random.Generator, shape: tuple[int, ...], cutoff: float) -> np.ndarray:
    """Gaussian low-pass filtered white noise over the last two axes, unit std per map."""
    h, w = shape[-2], shape[-1]
    noise = rng.standard_normal(shape)
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    gain = np.exp(-(fx**2 + fy**2) / (2.0 * cutoff**2))
    out = np.fft.irfft2(np.fft.rfft2(noise) * gain, s=(h, w))
    out -= out.mean(axis=(-2, -1), keepdims=True)
    out /= out.std(axis=(-2, -1), keepdims=True) + 1e-12
    return out


def smooth_images(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """uint8 RGB images [n, h, w, 3]: gradients + blobs + a little texture, like small photos."""
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    imgs = np.empty((n, h, w, 3), dtype=np.float64)
    for i in range(n):
        base = rng.uniform(0.2, 0.8, size=3)
        angle = rng.uniform(0, 2 * np.pi)
        grad = np.cos(angle) * xx + np.sin(angle) * yy
        grad_gain = rng.uniform(0.05, 0.35, size=3)
        blobs = _lowpass(rng, (3, h, w), cutoff=rng.uniform(0.03, 0.08))
        shared = _lowpass(rng, (h, w), cutoff=rng.uniform(0.04, 0.1))
        texture = _lowpass(rng, (3, h, w), cutoff=0.3)
        img = (
            base[:, None, None]
            + grad_gain[:, None, None] * grad
            + 0.12 * blobs
            + 0.10 * shared[None]
            + 0.02 * texture
        )
        imgs[i] = np.clip(img, 0.0, 1.0).transpose(1, 2, 0)
    return np.round(imgs * 255.0).astype(np.uint8)


def imagenet_normalize(imgs_u8: np.ndarray) -> np.ndarray:
    """uint8 [n, h, w, 3] -> float32 [n, 1, 3, h, w] ImageNet-normalized."""
    x = imgs_u8.astype(np.float32) / np.float32(255.0)
    x = (x - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)[:, None]).astype(np.float32)


def feature_maps(rng: np.random.Generator, n: int, c: int, h: int, w: int) -> np.ndarray:
    """Post-ReLU-like smooth feature maps [n, 1, c, h, w], rounded to fp16 precision."""
    x = _lowpass(rng, (n, c, h, w), cutoff=0.12)
    scale = rng.uniform(0.5, 2.0, size=(1, c, 1, 1))
    shift = rng.uniform(-0.5, 0.5, size=(1, c, 1, 1))
    x = np.maximum(x * scale + shift, 0.0)
    return _fp16_round(x[:, None])


def token_embeddings(rng: np.random.Generator, n: int, seq: int, dim: int) -> np.ndarray:
    """Transformer hidden states [n, 1, seq, dim]: token embeddings + sinusoidal positions."""
    vocab = rng.standard_normal((100, dim)) * 0.8
    ids = rng.integers(0, 100, size=(n, seq))
    pos = np.arange(seq)[:, None]
    freq = np.exp(-np.log(10000.0) * (np.arange(0, dim, 2) / dim))[None, :]
    pe = np.zeros((seq, dim))
    pe[:, 0::2] = np.sin(pos * freq)
    pe[:, 1::2] = np.cos(pos * freq)
    # a few outlier channels, as in real transformer activations
    outlier = np.ones(dim)
    outlier[rng.choice(dim, size=3, replace=False)] = rng.uniform(3.0, 6.0, size=3)
    x = (vocab[ids] + 0.5 * pe[None]) * outlier
    return _fp16_round(x[:, None])


def pooled_features(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """Global-average-pooled CNN features [n, 1, dim]: non-negative, correlated, heavy-ish tail."""
    mix = rng.standard_normal((8, dim))
    z = rng.standard_normal((n, 8)) @ mix / np.sqrt(8) + rng.standard_normal((n, dim)) * 0.5
    x = np.log1p(np.exp(z + rng.uniform(-1.0, 0.5, size=dim)))  # softplus
    return _fp16_round(x[:, None])


def _fp16_round(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------------


def he(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    return (rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)).astype(np.float32)


def glorot(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int, fan_out: int) -> np.ndarray:
    return (rng.standard_normal(shape) * math.sqrt(2.0 / (fan_in + fan_out))).astype(np.float32)


def small_bias(rng: np.random.Generator, n: int, scale: float = 0.05) -> np.ndarray:
    return (rng.standard_normal(n) * scale).astype(np.float32)


class Builder:
    """Tiny graph builder: collects nodes and initializers with readable names."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, np.ndarray] = {}
        self.bns: list[str] = []  # BN node names, topological order
        self._count: dict[str, int] = {}

    def uniq(self, prefix: str) -> str:
        k = self._count.get(prefix, 0)
        self._count[prefix] = k + 1
        return f"{prefix}{k}" if k else prefix

    def init(self, name: str, value: np.ndarray) -> str:
        assert name not in self.inits, name
        self.inits[name] = np.asarray(value)
        return name

    def node(self, op: str, inputs: list[str], name: str, n_out: int = 1, **attrs) -> list[str]:
        outs = [name] if n_out == 1 else [f"{name}_out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs

    def conv(
        self,
        x: str,
        name: str,
        cin: int,
        cout: int,
        k: int,
        stride: int = 1,
        group: int = 1,
        bias: bool = False,
        weight: str | None = None,
    ) -> str:
        if weight is None:
            weight = self.init(
                f"{name}.weight", he(self.rng, (cout, cin // group, k, k), cin // group * k * k)
            )
        ins = [x, weight]
        if bias:
            ins.append(self.init(f"{name}.bias", small_bias(self.rng, cout)))
        return self.node(
            "Conv",
            ins,
            name,
            kernel_shape=[k, k],
            strides=[stride, stride],
            pads=[k // 2] * 4,
            dilations=[1, 1],
            group=group,
        )[0]

    def bn(self, x: str, name: str, c: int) -> str:
        gamma = self.rng.uniform(0.6, 1.6, size=c).astype(np.float32)
        beta = (self.rng.standard_normal(c) * 0.25 + 0.1).astype(np.float32)
        ins = [
            x,
            self.init(f"{name}.weight", np.round(gamma, 4)),
            self.init(f"{name}.bias", np.round(beta, 4)),
            self.init(f"{name}.running_mean", np.zeros(c, np.float32)),  # measured later
            self.init(f"{name}.running_var", np.ones(c, np.float32)),  # measured later
        ]
        self.bns.append(name)
        return self.node("BatchNormalization", ins, name, epsilon=1e-5, momentum=0.9)[0]

    def relu(self, x: str, name: str) -> str:
        return self.node("Relu", [x], name)[0]

    def model(
        self,
        inputs: list[onnx.ValueInfoProto],
        outputs: list[onnx.ValueInfoProto],
        graph_name: str,
        opset: int = OPSET,
    ) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            graph_name,
            inputs,
            outputs,
            initializer=[numpy_helper.from_array(v, k) for k, v in self.inits.items()],
        )
        m = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", opset)],
            producer_name="qcompiler-fixtures",
            producer_version="1",
        )
        m.ir_version = IR_VERSION
        return m


# --------------------------------------------------------------------------------------------------
# BN statistics measured on the samples
# --------------------------------------------------------------------------------------------------


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def batch_feeds(samples: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """[S, 1, ...] -> [S, ...] for batch-dim inputs; weight-like inputs (no batch dim) use sample 0."""
    return {k: (v[0] if k in WEIGHT_INPUTS else v[:, 0]) for k, v in samples.items()}


def calibrate_bn(
    model: onnx.ModelProto, b: Builder, samples: dict[str, np.ndarray], rng: np.random.Generator
) -> onnx.ModelProto:
    """Set each BN's running mean/var to the statistics of its input on the samples (perturbed)."""
    feeds = batch_feeds(samples)
    by_name = {n.name: n for n in model.graph.node}
    init_idx = {t.name: i for i, t in enumerate(model.graph.initializer)}
    for bn_name in b.bns:
        node = by_name[bn_name]
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        del probe.graph.output[:]
        probe.graph.output.append(helper.make_tensor_value_info(node.input[0], F32, None))
        (act,) = _session(probe).run(None, feeds)
        axes = tuple(i for i in range(act.ndim) if i != 1)
        act = act.astype(np.float64)
        mean = act.mean(axis=axes)
        var = act.var(axis=axes)
        c = mean.shape[0]
        mean = mean + 0.1 * np.sqrt(var) * rng.standard_normal(c)
        var = var * rng.uniform(0.75, 1.35, size=c)
        mean = np.round(mean, 3).astype(np.float32)
        var = np.maximum(np.round(var, 3), 1e-3).astype(np.float32)
        for tname, val in ((node.input[3], mean), (node.input[4], var)):
            model.graph.initializer[init_idx[tname]].CopyFrom(numpy_helper.from_array(val, tname))
    return model


# --------------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------------


def _vi(name: str, dims: list, dtype: int = F32) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, dims)


def make_conv_bn_relu():
    rng = np.random.default_rng(1001)
    samples = {"input": imagenet_normalize(smooth_images(np.random.default_rng(2001), N_SAMPLES, 32, 32))}
    b = Builder(rng)
    x = b.relu(b.bn(b.conv("input", "conv1", 3, 8, 3, bias=True), "bn1", 8), "relu1")  # 32x32
    x = b.relu(b.bn(b.conv(x, "conv2", 8, 16, 3, stride=2), "bn2", 16), "relu2")  # 16x16
    # residual block
    r = b.relu(b.bn(b.conv(x, "block.conv1", 16, 16, 3), "block.bn1", 16), "block.relu1")
    r = b.bn(b.conv(r, "block.conv2", 16, 16, 3), "block.bn2", 16)
    x = b.relu(b.node("Add", [r, x], "block.add")[0], "block.relu2")
    # depthwise
    x = b.relu(b.bn(b.conv(x, "dw.conv", 16, 16, 3, stride=2, group=16), "dw.bn", 16), "dw.relu")  # 8x8
    x = b.node("GlobalAveragePool", [x], "gap")[0]
    x = b.node("Flatten", [x], "flatten", axis=1)[0]
    w = b.init("fc.weight", glorot(rng, (10, 16), 16, 10) * 2.0)
    c = b.init("fc.bias", small_bias(rng, 10, 0.1))
    b.node("Gemm", [x, w, c], "logits", transB=1, alpha=1.0, beta=1.0)
    m = b.model([_vi("input", ["N", 3, 32, 32])], [_vi("logits", ["N", 10])], "conv_bn_relu")
    return calibrate_bn(m, b, samples, rng), samples


def make_depthwise():
    rng = np.random.default_rng(1002)
    samples = {"input": feature_maps(np.random.default_rng(2002), N_SAMPLES, 8, 16, 16)}
    b = Builder(rng)
    x = b.relu(b.bn(b.conv("input", "expand.conv", 8, 32, 1), "expand.bn", 32), "expand.relu")
    x = b.relu(b.bn(b.conv(x, "dw.conv", 32, 32, 3, group=32), "dw.bn", 32), "dw.relu")
    x = b.conv(x, "project.conv", 32, 16, 1)
    b.nodes.append(
        helper.make_node(
            "BatchNormalization",
            [
                x,
                b.init("project.bn.weight", np.round(rng.uniform(0.6, 1.6, 16), 4).astype(np.float32)),
                b.init("project.bn.bias", np.round(rng.standard_normal(16) * 0.2, 4).astype(np.float32)),
                b.init("project.bn.running_mean", np.zeros(16, np.float32)),
                b.init("project.bn.running_var", np.ones(16, np.float32)),
            ],
            ["output"],
            name="project.bn",
            epsilon=1e-5,
        )
    )
    b.bns.append("project.bn")
    m = b.model([_vi("input", ["N", 8, 16, 16])], [_vi("output", ["N", 16, 16, 16])], "depthwise")
    return calibrate_bn(m, b, samples, rng), samples


def make_convtranspose_bn():
    rng = np.random.default_rng(1003)
    samples = {"input": feature_maps(np.random.default_rng(2003), N_SAMPLES, 4, 16, 16)}
    b = Builder(rng)
    x = b.conv("input", "conv", 4, 8, 3, bias=True)
    # ConvTranspose weight layout: [C_in, C_out / group, kH, kW]
    w = b.init("up.weight", he(rng, (8, 8, 4, 4), 8 * 4 * 4 // 4))
    x = b.node(
        "ConvTranspose",
        [x, w, b.init("up.bias", small_bias(rng, 8))],
        "up",
        kernel_shape=[4, 4],
        strides=[2, 2],
        pads=[1, 1, 1, 1],
        group=1,
    )[0]
    x = b.bn(x, "up.bn", 8)
    b.node("Relu", [x], "output")
    m = b.model([_vi("input", ["N", 4, 16, 16])], [_vi("output", ["N", 8, 32, 32])], "convtranspose_bn")
    return calibrate_bn(m, b, samples, rng), samples


def make_gemm_head():
    rng = np.random.default_rng(1004)
    samples = {"input": pooled_features(np.random.default_rng(2004), N_SAMPLES, 64)}
    b = Builder(rng)
    w1 = b.init("fc1.weight", he(rng, (64, 32), 64))  # [K, N], transB=0
    x = b.node("Gemm", ["input", w1, b.init("fc1.bias", small_bias(rng, 32))], "fc1", transB=0)[0]
    x = b.relu(b.bn(x, "bn1", 32), "relu1")
    w2 = b.init("fc2.weight", he(rng, (16, 32), 32))  # [N, K], transB=1
    x = b.node("Gemm", [x, w2, b.init("fc2.bias", small_bias(rng, 16))], "fc2", transB=1)[0]
    x = b.relu(b.bn(x, "bn2", 16), "relu2")
    w3 = b.init("fc3.weight", glorot(rng, (16, 10), 16, 10) * 2.0)
    x = b.node("MatMul", [x, w3], "fc3.matmul")[0]
    x = b.node("Add", [x, b.init("fc3.bias", small_bias(rng, 10))], "fc3.add")[0]
    b.nodes.append(
        helper.make_node(
            "BatchNormalization",
            [
                x,
                b.init("bn3.weight", np.round(rng.uniform(0.6, 1.6, 10), 4).astype(np.float32)),
                b.init("bn3.bias", np.round(rng.standard_normal(10) * 0.2, 4).astype(np.float32)),
                b.init("bn3.running_mean", np.zeros(10, np.float32)),
                b.init("bn3.running_var", np.ones(10, np.float32)),
            ],
            ["output"],
            name="bn3",
            epsilon=1e-5,
        )
    )
    b.bns.append("bn3")
    m = b.model([_vi("input", ["N", 64])], [_vi("output", ["N", 10])], "gemm_head")
    return calibrate_bn(m, b, samples, rng), samples


def make_transformer_block():
    rng = np.random.default_rng(1005)
    samples = {"x": token_embeddings(np.random.default_rng(2005), N_SAMPLES, 16, 64)}
    d, heads, dh, hidden = 64, 2, 32, 128
    b = Builder(rng)

    def layernorm(x: str, name: str) -> str:
        g = b.init(f"{name}.weight", np.round(rng.uniform(0.7, 1.3, d), 4).astype(np.float32))
        be = b.init(f"{name}.bias", np.round(rng.standard_normal(d) * 0.05, 4).astype(np.float32))
        return b.node("LayerNormalization", [x, g, be], name, axis=-1, epsilon=1e-5)[0]

    def linear(x: str, name: str, k: int, n: int, gain: float = 1.0) -> str:
        w = b.init(f"{name}.weight", (rng.standard_normal((k, n)) * gain / math.sqrt(k)).astype(np.float32))
        y = b.node("MatMul", [x, w], f"{name}.matmul")[0]
        return b.node("Add", [y, b.init(f"{name}.bias", small_bias(rng, n, 0.02))], f"{name}.add")[0]

    split_shape = b.init("attn.split_shape", np.array([0, 0, heads, dh], np.int64))
    merge_shape = b.init("attn.merge_shape", np.array([0, 0, d], np.int64))
    h = layernorm("x", "ln1")
    q = linear(h, "attn.q", d, d, gain=1.6)
    k = linear(h, "attn.k", d, d, gain=1.6)
    v = linear(h, "attn.v", d, d)
    q = b.node(
        "Transpose",
        [b.node("Reshape", [q, split_shape], "attn.q.reshape")[0]],
        "attn.q.transpose",
        perm=[0, 2, 1, 3],
    )[0]  # [N, H, S, Dh]
    k = b.node(
        "Transpose",
        [b.node("Reshape", [k, split_shape], "attn.k.reshape")[0]],
        "attn.k.transpose",
        perm=[0, 2, 3, 1],
    )[0]  # [N, H, Dh, S]
    v = b.node(
        "Transpose",
        [b.node("Reshape", [v, split_shape], "attn.v.reshape")[0]],
        "attn.v.transpose",
        perm=[0, 2, 1, 3],
    )[0]  # [N, H, S, Dh]
    s = b.node("MatMul", [q, k], "attn.qk")[0]
    s = b.node("Mul", [s, b.init("attn.scale", np.array(1.0 / math.sqrt(dh), np.float32))], "attn.scale_mul")[
        0
    ]
    p = b.node("Softmax", [s], "attn.softmax", axis=-1)[0]
    o = b.node("MatMul", [p, v], "attn.pv")[0]
    o = b.node("Transpose", [o], "attn.o.transpose", perm=[0, 2, 1, 3])[0]
    o = b.node("Reshape", [o, merge_shape], "attn.o.reshape")[0]
    o = linear(o, "attn.out", d, d)
    h1 = b.node("Add", ["x", o], "residual1")[0]
    m = layernorm(h1, "ln2")
    m = linear(m, "mlp.fc1", d, hidden, gain=math.sqrt(2.0))
    # GELU(x) = x * 0.5 * (1 + erf(x / sqrt(2)))
    g = b.node("Div", [m, b.init("gelu.sqrt2", np.array(math.sqrt(2.0), np.float32))], "gelu.div")[0]
    g = b.node("Erf", [g], "gelu.erf")[0]
    g = b.node("Add", [g, b.init("gelu.one", np.array(1.0, np.float32))], "gelu.add")[0]
    g = b.node("Mul", [m, g], "gelu.mul")[0]
    g = b.node("Mul", [g, b.init("gelu.half", np.array(0.5, np.float32))], "gelu.mul_half")[0]
    m = linear(g, "mlp.fc2", hidden, d, gain=0.7)
    b.node("Add", [h1, m], "y")
    model = b.model([_vi("x", ["N", 16, 64])], [_vi("y", ["N", 16, 64])], "transformer_block")
    return model, samples


def make_shared_weight():
    rng = np.random.default_rng(1006)
    srng = np.random.default_rng(2006)
    base_w = he(srng, (8, 8, 3, 3), 72)
    dyn = base_w[None] * (1.0 + 0.1 * srng.standard_normal((N_SAMPLES, 8, 1, 1, 1)))
    samples = {
        "input": feature_maps(srng, N_SAMPLES, 8, 16, 16),
        "dyn_weight": _fp16_round(dyn),  # [32, 8, 8, 3, 3]: one weight per sample (no batch dim)
    }
    b = Builder(rng)
    shared = b.init("shared.weight", he(rng, (8, 8, 3, 3), 72))
    a = b.relu(
        b.bn(b.conv("input", "branch_a.conv", 8, 8, 3, weight=shared), "branch_a.bn", 8), "branch_a.relu"
    )
    c = b.relu(
        b.bn(b.conv("input", "branch_b.conv", 8, 8, 3, weight=shared), "branch_b.bn", 8), "branch_b.relu"
    )
    x = b.node("Add", [a, c], "merge")[0]
    x = b.conv(x, "dynamic.conv", 8, 8, 3, weight="dyn_weight")
    b.nodes.append(
        helper.make_node(
            "BatchNormalization",
            [
                x,
                b.init("dynamic.bn.weight", np.round(rng.uniform(0.6, 1.6, 8), 4).astype(np.float32)),
                b.init("dynamic.bn.bias", np.round(rng.standard_normal(8) * 0.2, 4).astype(np.float32)),
                b.init("dynamic.bn.running_mean", np.zeros(8, np.float32)),
                b.init("dynamic.bn.running_var", np.ones(8, np.float32)),
            ],
            ["output"],
            name="dynamic.bn",
            epsilon=1e-5,
        )
    )
    b.bns.append("dynamic.bn")
    m = b.model(
        [_vi("input", ["N", 8, 16, 16]), _vi("dyn_weight", [8, 8, 3, 3])],
        [_vi("output", ["N", 8, 16, 16])],
        "shared_weight",
    )
    return calibrate_bn(m, b, samples, rng), samples


def make_fp16_conv():
    rng = np.random.default_rng(1007)
    samples = {"input": imagenet_normalize(smooth_images(np.random.default_rng(2007), N_SAMPLES, 16, 16))}
    b = Builder(rng)
    x = b.relu(b.bn(b.conv("input", "conv1", 3, 8, 3), "bn1", 8), "relu1")
    w = b.init("conv2.weight", he(rng, (4, 8, 3, 3), 72))
    b.node(
        "Conv",
        [x, w, b.init("conv2.bias", small_bias(rng, 4))],
        "output",
        kernel_shape=[3, 3],
        pads=[1, 1, 1, 1],
        strides=[1, 1],
    )
    m = b.model([_vi("input", ["N", 3, 16, 16])], [_vi("output", ["N", 4, 16, 16])], "fp16_conv")
    m = calibrate_bn(m, b, samples, rng)
    # convert everything to float16
    for t in m.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for vi in list(m.graph.input) + list(m.graph.output):
        vi.type.tensor_type.elem_type = F16
    samples = {k: v.astype(np.float16) for k, v in samples.items()}
    return m, samples


def make_opset11_constants():
    """Paddle-export style: opset 11, every weight a Constant node (no initializers)."""
    rng = np.random.default_rng(1008)
    samples = {"x": imagenet_normalize(smooth_images(np.random.default_rng(2008), N_SAMPLES, 24, 24))}
    b = Builder(rng)
    x = b.relu(b.bn(b.conv("x", "conv2d_0", 3, 8, 3, stride=2), "batch_norm_0", 8), "relu_0")
    x = b.relu(b.bn(b.conv(x, "conv2d_1", 8, 16, 3), "batch_norm_1", 16), "relu_1")
    x = b.node("GlobalAveragePool", [x], "pool2d_0")[0]
    x = b.node("Flatten", [x], "flatten_0", axis=1)[0]
    w = b.init("linear_0.w_0", glorot(rng, (16, 10), 16, 10) * 2.0)  # Paddle keeps [in, out]
    b.node("Gemm", [x, w, b.init("linear_0.b_0", small_bias(rng, 10, 0.1))], "output", transB=0)
    m = b.model([_vi("x", ["N", 3, 24, 24])], [_vi("output", ["N", 10])], "opset11_constants", opset=11)
    m = calibrate_bn(m, b, samples, rng)
    # move initializers into Constant nodes, placed first
    consts = [
        helper.make_node("Constant", [], [t.name], name=f"{t.name}.const", value=t)
        for t in m.graph.initializer
    ]
    nodes = list(m.graph.node)
    del m.graph.initializer[:]
    del m.graph.node[:]
    m.graph.node.extend(consts + nodes)
    return m, samples


def token_ids(rng: np.random.Generator, n: int, seq: int, vocab: int) -> np.ndarray:
    """int64 [n, 1, seq] token ids like a WordPiece tokenizer's: [CLS]=1 first, [SEP]=2 last, words drawn from a
    Zipf-like law over ids 5.. (frequent ids small, as in a frequency-sorted vocabulary), [PAD]=0 after [SEP]."""
    ranks = np.arange(5, vocab)
    p = 1.0 / (ranks - 4.0 + 8.0) ** 1.07
    p /= p.sum()
    out = np.zeros((n, 1, seq), np.int64)
    for i in range(n):
        length = int(rng.integers(seq // 2, seq + 1))
        out[i, 0, 0] = 1
        out[i, 0, 1 : length - 1] = rng.choice(ranks, size=length - 2, p=p)
        out[i, 0, length - 1] = 2
    return out


def make_text_encoder():
    """A BERT-like encoder layer, small: 4000 x 128 word-embedding table (Gather), positions, LayerNorm,
    4-head attention, GELU MLP, and the output projection tied to the embedding table (``Gemm(h, E, transB=1)``,
    the table read by both), logits [N, 32, 4000]. Rows of the table have frequency-dependent norms."""
    rng = np.random.default_rng(1009)
    vocab, seq, d, heads, hidden = 4000, 32, 128, 4, 512
    dh = d // heads
    samples = {"input_ids": token_ids(np.random.default_rng(2009), N_SAMPLES, seq, vocab)}
    b = Builder(rng)
    row_norm = np.exp(rng.normal(0.0, 0.35, size=(vocab, 1))) * (1.0 + 0.6 / np.sqrt(1.0 + np.arange(vocab)[:, None]))
    table = b.init("embeddings.word.weight", (rng.standard_normal((vocab, d)) * 0.045 * row_norm).astype(np.float32))
    pos = np.arange(seq)[:, None] / np.power(10000.0, np.arange(0, d, 2)[None, :] / d)
    pe = np.zeros((1, seq, d), np.float32)
    pe[0, :, 0::2], pe[0, :, 1::2] = np.sin(pos) * 0.1, np.cos(pos) * 0.1
    x = b.node("Gather", [table, "input_ids"], "embeddings.word", axis=0)[0]
    x = b.node("Add", [x, b.init("embeddings.position", pe)], "embeddings.add_position")[0]

    def layernorm(x: str, name: str) -> str:
        g = b.init(f"{name}.weight", np.round(rng.uniform(0.7, 1.3, d), 4).astype(np.float32))
        be = b.init(f"{name}.bias", np.round(rng.standard_normal(d) * 0.05, 4).astype(np.float32))
        return b.node("LayerNormalization", [x, g, be], name, axis=-1, epsilon=1e-12)[0]

    def linear(x: str, name: str, k: int, n: int, gain: float = 1.0) -> str:
        w = b.init(f"{name}.weight", (rng.standard_normal((k, n)) * gain / math.sqrt(k)).astype(np.float32))
        y = b.node("MatMul", [x, w], f"{name}.matmul")[0]
        return b.node("Add", [y, b.init(f"{name}.bias", small_bias(rng, n, 0.02))], f"{name}.add")[0]

    h = layernorm(x, "embeddings.ln")
    split = b.init("attn.split_shape", np.array([0, 0, heads, dh], np.int64))
    q, k, v = (linear(h, f"attn.{t}", d, d, gain=1.4) for t in "qkv")
    q = b.node("Transpose", [b.node("Reshape", [q, split], "attn.q.reshape")[0]], "attn.q.t", perm=[0, 2, 1, 3])[0]
    k = b.node("Transpose", [b.node("Reshape", [k, split], "attn.k.reshape")[0]], "attn.k.t", perm=[0, 2, 3, 1])[0]
    v = b.node("Transpose", [b.node("Reshape", [v, split], "attn.v.reshape")[0]], "attn.v.t", perm=[0, 2, 1, 3])[0]
    s = b.node("MatMul", [q, k], "attn.qk")[0]
    s = b.node("Mul", [s, b.init("attn.scale", np.array(1.0 / math.sqrt(dh), np.float32))], "attn.scale_mul")[0]
    o = b.node("MatMul", [b.node("Softmax", [s], "attn.softmax", axis=-1)[0], v], "attn.pv")[0]
    o = b.node("Transpose", [o], "attn.o.t", perm=[0, 2, 1, 3])[0]
    o = b.node("Reshape", [o, b.init("attn.merge_shape", np.array([0, 0, d], np.int64))], "attn.o.reshape")[0]
    h = layernorm(b.node("Add", [h, linear(o, "attn.out", d, d)], "residual1")[0], "attn.ln")
    m = linear(h, "mlp.fc1", d, hidden, gain=math.sqrt(2.0))
    g = b.node("Erf", [b.node("Div", [m, b.init("gelu.sqrt2", np.array(math.sqrt(2.0), np.float32))], "gelu.div")[0]],
               "gelu.erf")[0]
    g = b.node("Add", [g, b.init("gelu.one", np.array(1.0, np.float32))], "gelu.add")[0]
    g = b.node("Mul", [b.node("Mul", [m, g], "gelu.mul")[0], b.init("gelu.half", np.array(0.5, np.float32))],
               "gelu.mul_half")[0]
    h = layernorm(b.node("Add", [h, linear(g, "mlp.fc2", hidden, d, gain=0.7)], "residual2")[0], "mlp.ln")
    # tied output projection: logits = h @ E^T, the Gemm reading the embedding table itself
    h2 = b.node("Reshape", [h, b.init("head.flat_shape", np.array([-1, d], np.int64))], "head.flatten")[0]
    logits = b.node("Gemm", [h2, table, b.init("head.bias", small_bias(rng, vocab, 0.01))], "head.gemm",
                    transB=1)[0]
    b.node("Reshape", [logits, b.init("head.out_shape", np.array([-1, seq, vocab], np.int64))], "logits")
    model = b.model([_vi("input_ids", ["N", seq], TensorProto.INT64)], [_vi("logits", ["N", seq, vocab])],
                    "text_encoder")
    return model, samples


FIXTURES: dict[str, Callable[[], tuple[onnx.ModelProto, dict[str, np.ndarray]]]] = {
    "conv_bn_relu": make_conv_bn_relu,
    "depthwise": make_depthwise,
    "convtranspose_bn": make_convtranspose_bn,
    "gemm_head": make_gemm_head,
    "transformer_block": make_transformer_block,
    "shared_weight": make_shared_weight,
    "fp16_conv": make_fp16_conv,
    "opset11_constants": make_opset11_constants,
    "text_encoder": make_text_encoder,
}


# --------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like np.savez_compressed, but with fixed zip timestamps (byte-reproducible)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)


def write_all(out: Path, names: list[str] | None = None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names or list(FIXTURES):
        model, samples = FIXTURES[name]()
        onnx.checker.check_model(model, full_check=True)
        p = out / f"{name}.onnx"
        p.write_bytes(model.SerializeToString())
        q = out / f"{name}.npz"
        save_npz(q, samples)
        written += [p, q]
    return written


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("names", nargs="*", help=f"subset of fixtures (default: all of {', '.join(FIXTURES)})")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.names) - set(FIXTURES))
    if unknown:
        ap.error(f"unknown fixture(s): {', '.join(unknown)}")
    for p in write_all(args.out, args.names or None):
        print(f"{p}  {p.stat().st_size} bytes")


if __name__ == "__main__":
    main()
