"""Quantization axes of the weight ops: which axis of a weight holds its output channels, and which the reduction.

``per_channel_axis`` is the axis that gets one scale per slice (Conv ``W[M, C/g, kH, kW]`` → 0, ConvTranspose
``W[C, M/g, kH, kW]`` → 1, Gemm by ``transB``, MatMul ``[..., K, N]`` → last, LSTM / GRU / RNN → 1, one scale per
gate row, Gather's table ``[rows, dim]`` → 0, one scale per row). ``block_axis`` is the reduction axis along which block-wise quantization cuts blocks.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs


def per_channel_axis(node: gs.Node, ndim: int) -> int:
    if node.op == "Gather":
        return 0  # an embedding table [rows, dim]: one scale per row
    if node.op in ("LSTM", "GRU", "RNN"):
        return 1  # W [dirs, gates*H, I], R [dirs, gates*H, H]: one scale per gate row
    if node.op == "Conv":
        return 0
    if node.op == "ConvTranspose":
        return 1
    if node.op == "Gemm":
        return 0 if int(node.attrs.get("transB", 0)) else 1
    return ndim - 1  # MatMul [..., K, N]


def block_axis(node: gs.Node, ndim: int) -> int:
    if node.op == "Gather":
        return 1  # blocks along each row of the table
    if node.op in ("LSTM", "GRU", "RNN"):
        return 2
    if node.op == "Conv":
        return 1
    if node.op == "ConvTranspose":
        return 0
    if node.op == "Gemm":
        return 1 if int(node.attrs.get("transB", 0)) else 0
    return ndim - 2
