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

from kiln.ir.graph import Graph, Node, Value
from kiln.passes.autodiff import GradBuilder
from kiln.passes.base import graph_pass
from kiln.passes.rewrite import replace_node


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
    at compile time. Where the run-time B is the big operand (a training step's x W^T with a
    batch smaller than W), the product is taken the other way round instead, C = (W x^T)^T,
    which transposes x and C: fewer elements than W."""
    made: dict[Value, Value] = {}
    for index in range(len(graph.nodes) - 1, -1, -1):
        node = graph.nodes[index]
        if node.op.name != "Gemm":
            continue
        if _swap_is_cheaper(graph, node):
            _swap_operands(graph, node)
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


def _swap_is_cheaper(graph: Graph, node: Node) -> bool:
    """x (m, k) and C (m, n) hold fewer elements than the run-time B (n, k) of x B^T."""
    a, bm = node.inputs[0], node.inputs[1]
    if not node.attrs["transB"] or node.attrs["transA"] or bm in graph.params or a in graph.params:
        return False
    (m, k), n = a.type.shape, bm.type.shape[0]
    return m * k + m * n < n * k


def _swap_operands(graph: Graph, node: Node) -> None:
    """``Gemm(x, W, c) {transB=1}`` as ``Transpose(Gemm(W, x^T, c^T))``: W is read as A, rows
    as they are, and only x and the result are transposed."""
    x, w = node.inputs[0], node.inputs[1]
    c = node.inputs[2] if len(node.inputs) > 2 else None
    b = GradBuilder(graph, node.name or "Gemm")
    start = len(graph.nodes)
    inputs = [w, b.op("Transpose", x, perm=[1, 0])]
    if c is not None:  # C broadcasts against (m, n): its transpose against (n, m)
        shape = (1,) * (2 - c.type.rank) + tuple(c.type.shape)
        inputs.append(b.op("Transpose", b.reshape(c, shape), perm=[1, 0]) if shape[0] != 1 else b.reshape(c, shape[::-1]))
    product = b.op("Gemm", *inputs, alpha=node.attrs["alpha"], beta=node.attrs["beta"], transA=0, transB=0)
    replace_node(graph, node, [b.op("Transpose", product, perm=[1, 0])], start)
