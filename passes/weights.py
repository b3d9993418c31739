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
    """Gemm operands made row-major: constants with either flag transposed at compile time; a
    B computed at run time and read with transB=1 either transposed by one node that all its
    Gemms share (an unrolled RNN reads its recurrent weights at every step), or, where that
    costs more, each product taken the other way round, C = (W x^T)^T, transposing x and C
    (a training step's x W^T with a batch smaller than W)."""
    made: dict[Value, Value] = {}
    for node in graph.nodes:
        if node.op.name == "Gemm":
            for slot, flag in ((0, "transA"), (1, "transB")):
                if node.attrs[flag] and node.inputs[slot] in graph.params:
                    node.inputs[slot] = _transposed(graph, node.inputs[slot], made)
                    node.attrs[flag] = 0
    readers: dict[Value, list[Node]] = {}
    for node in graph.nodes:
        if node.op.name == "Gemm" and node.attrs["transB"]:
            readers.setdefault(node.inputs[1], []).append(node)
    for value, gemms in readers.items():
        n, k = value.type.shape
        swap_cost = sum(_swap_elements(graph, g) for g in gemms)
        if swap_cost < n * k:
            for gemm in gemms:
                _swap_operands(graph, gemm)
            continue
        first = min(graph.nodes.index(g) for g in gemms)
        flipped = graph.add_node("Transpose", [value], {"perm": [1, 0]}, name=f"{gemms[0].name or 'Gemm'}/transB", index=first).outputs[0]
        for gemm in gemms:
            gemm.inputs[1] = flipped
            gemm.attrs["transB"] = 0
    graph.remove_unread_params()
    return graph


def _swap_elements(graph: Graph, node: Node) -> float:
    """What computing ``node`` (x B^T) as (B x^T)^T transposes: x and C (inf where it cannot:
    a transposed x, or a constant one, which a transpose at compile time serves better)."""
    a = node.inputs[0]
    if node.attrs["transA"] or a in graph.params:
        return float("inf")
    (m, k), n = a.type.shape, node.inputs[1].type.shape[0]
    return m * k + m * n


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
