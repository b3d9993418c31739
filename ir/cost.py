"""Work estimates of a graph: FLOPs as 2 x the multiply-accumulates of its heavy ops.

The count covers convolutions, transposed convolutions, matrix products and recurrent cells
(the convention of fvcore and most papers' "FLOPs" x 2); elementwise ops, pooling and
normalization are left out. Fused nodes count their bodies.
"""

from __future__ import annotations

import math

from kiln.ir.graph import Graph, Node


def node_macs(node: Node) -> int:
    """Multiply-accumulates of one node (0 for the ops the count leaves out)."""
    op = node.op.name
    ins = [v.type if v is not None else None for v in node.inputs]
    out = node.outputs[0].type
    if op == "Fused":
        return graph_macs(node.attrs["body"])
    if op in ("Conv", "ConvInteger"):  # each output element: one MAC per weight of its output channel
        w = ins[1]
        channels = w.shape[-1] if node.attrs["layout"] == "NHWC" else w.shape[0]
        return out.numel * (w.numel // channels)
    if op == "ConvTranspose":
        x, w = ins[0].shape, ins[1].shape
        return math.prod(x) * math.prod(w[1:])
    if op == "MatMul":
        k = ins[0].shape[-1]
        return out.numel * k
    if op == "Gemm":
        k = ins[0].shape[0] if node.attrs["transA"] else ins[0].shape[1]
        return out.numel * k
    if op in ("LSTM", "GRU", "RNN"):
        gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
        x, w, r = ins[0].shape, ins[1].shape, ins[2].shape
        steps_times_batch = x[0] * x[1]
        dirs, hidden = w[0], r[2]
        return steps_times_batch * dirs * gates * hidden * (w[2] + hidden)
    if op == "DynamicQuantizeLSTM":  # W (dirs, input, 4 * hidden), R (dirs, hidden, 4 * hidden)
        x, w, r = ins[0].shape, ins[1].shape, ins[2].shape
        return x[0] * x[1] * w[0] * w[2] * (w[1] + r[1])
    return 0


def graph_macs(graph: Graph) -> int:
    return sum(node_macs(node) for node in graph.nodes)


def graph_flops(graph: Graph) -> int:
    """2 x multiply-accumulates of the convolutions, matrix products and recurrent cells."""
    return 2 * graph_macs(graph)
