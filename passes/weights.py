"""pretranspose_weights: constant GEMM weights stored the way the kernels read them;
row_major_gemm: the same for B computed at run time (a transpose node, O(K N), before an
O(M K N) product); a transposed A computed at run time stays (the kernel reads A^T in place,
MR contiguous elements per k).

``Gemm(a, B, c) {transB=1}`` with a constant ``B`` (PyTorch's Linear layout, (N, K)) becomes
``Gemm(a, B.T, c) {transB=0}`` with ``B.T`` computed now: the backends' GEMM streams rows of B,
and a transposed B would be read with a stride of K on every multiply-add.

Preconditions: none. Postconditions: no Gemm with transB=1 on a parameter; outputs unchanged.
"""

from __future__ import annotations

import numpy as np

from kiln.ir.graph import Graph, Value
from kiln.passes.base import graph_pass


def _transposed(graph: Graph, value: Value, made: dict[Value, Value]) -> Value:
    """The parameter ``value`` transposed now: one copy however many Gemms read it (an
    unrolled LSTM reads its recurrent weights once per step; a copy each would stream 1 MB of
    fresh weights from memory every step instead of reading one copy from the cache)."""
    if value not in made:
        made[value] = graph.add_param(graph.fresh_name(f"{value.name}.T"), np.ascontiguousarray(graph.params[value].T))
    return made[value]


@graph_pass("pretranspose_weights")
def pretranspose_weights(graph: Graph) -> Graph:
    """Gemm weights with transB=1 transposed at compile time (see the module docstring)."""
    made: dict[Value, Value] = {}
    for node in graph.nodes:
        if node.op.name != "Gemm" or not node.attrs["transB"] or node.inputs[1] not in graph.params:
            continue
        node.inputs[1] = _transposed(graph, node.inputs[1], made)
        node.attrs["transB"] = 0
    graph.remove_unread_params()
    return graph


@graph_pass("row_major_gemm")
def row_major_gemm(graph: Graph) -> Graph:
    """Gemm B operands with transB=1 transposed by a node first, and constants with either flag
    at compile time."""
    made: dict[Value, Value] = {}
    for index in range(len(graph.nodes) - 1, -1, -1):
        node = graph.nodes[index]
        if node.op.name != "Gemm":
            continue
        for slot, flag in ((0, "transA"), (1, "transB")):
            if not node.attrs[flag] or slot == 0 and node.inputs[0] not in graph.params:
                continue  # a transposed A computed at run time is read in place
            value = node.inputs[slot]
            if value in graph.params:
                flipped = _transposed(graph, value, made)
            else:
                flipped = graph.add_node("Transpose", [value], {"perm": [1, 0]}, name=f"{node.name or 'Gemm'}/{flag}", index=index).outputs[0]
                index += 1
            node.inputs[slot] = flipped
            node.attrs[flag] = 0
    graph.remove_unread_params()
    return graph
