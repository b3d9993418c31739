"""merge_gemm_sums: a sum of Gemm products as one Gemm over the concatenated inner dimension.

``A1^T B1 + A2^T B2 + ... = [A1; A2; ...]^T [B1; B2; ...]``. Backpropagation through time
builds exactly such sums: a recurrent weight's gradient adds one small product per unrolled step
(an LSTM's 1024x256 gradient: 62 products over 16 rows each), and each Add reads and writes
the whole matrix again. One Gemm with K = the steps' rows together does the same arithmetic
reading each operand once.

Preconditions: none. Postconditions: no tree of single-use Adds has two or more leaves that
are single-use Gemms of one kind (same flags, alpha 1, no C, one output shape); outputs keep
their names.
"""

from __future__ import annotations

from kiln.ir.graph import Graph, Node, Value
from kiln.passes.base import graph_pass
from kiln.passes.rewrite import substitute


def _readers(graph: Graph) -> dict[int, int]:
    count: dict[int, int] = {}
    for node in graph.nodes:
        for v in node.inputs:
            if v is not None:
                count[id(v)] = count.get(id(v), 0) + 1
    for v in graph.outputs:
        count[id(v)] = count.get(id(v), 0) + 1
    return count


def _same_shape_add(node: Node | None) -> bool:
    return node is not None and node.op.name == "Add" and all(v.type == node.outputs[0].type for v in node.inputs)


def _mergeable(node: Node | None) -> bool:
    """A plain product: Gemm without C, alpha 1, float."""
    return node is not None and node.op.name == "Gemm" and len(node.inputs) == 2 and node.attrs["alpha"] == 1.0 and node.outputs[0].type.dtype.is_float


@graph_pass("merge_gemm_sums")
def merge_gemm_sums(graph: Graph) -> Graph:
    """Sums of Gemm products merged into one Gemm (see the module docstring)."""
    readers = _readers(graph)
    parent_add = {id(v) for n in graph.nodes if _same_shape_add(n) for v in n.inputs}
    for root in [n for n in graph.nodes if _same_shape_add(n)]:
        if id(root.outputs[0]) in parent_add and readers[id(root.outputs[0])] == 1:
            continue  # not the top of its tree: its reader is an Add that will collect it
        leaves, adds, stack = [], [], [root]
        while stack:  # the tree of single-use Adds under root
            add = stack.pop()
            adds.append(add)
            for v in add.inputs:
                inner = v.producer
                if _same_shape_add(inner) and readers[id(v)] == 1:
                    stack.append(inner)
                else:
                    leaves.append(v)
        groups: dict[tuple, list[Node]] = {}
        for v in leaves:
            if _mergeable(v.producer) and readers[id(v)] == 1:
                gemm = v.producer
                groups.setdefault((gemm.attrs["transA"], gemm.attrs["transB"]), []).append(gemm)
        kind, gemms = max(groups.items(), key=lambda item: len(item[1]), default=(None, []))
        if len(gemms) < 2:
            continue
        trans_a, trans_b = kind
        at = graph.nodes.index(root)  # the root reads (through its tree) every leaf: all exist by now
        a = graph.add_node("Concat", [g.inputs[0] for g in gemms], {"axis": 0 if trans_a else 1}, name=f"{root.name or 'Add'}/gemm_sum.A", index=at).outputs[0]
        b = graph.add_node("Concat", [g.inputs[1] for g in gemms], {"axis": 1 if trans_b else 0}, name=f"{root.name or 'Add'}/gemm_sum.B", index=at + 1).outputs[0]
        total = graph.add_node("Gemm", [a, b], {"alpha": 1.0, "beta": 1.0, "transA": trans_a, "transB": trans_b}, name=f"{root.name or 'Add'}/gemm_sum", index=at + 2).outputs[0]
        merged = {id(g.outputs[0]) for g in gemms}
        index = at + 3
        for v in leaves:
            if id(v) not in merged:
                total = graph.add_node("Add", [total, v], name=f"{root.name or 'Add'}/gemm_sum.add", index=index).outputs[0]
                index += 1
        _replace(graph, root.outputs[0], total)
        graph.remove_nodes([*adds, *gemms])
        readers = _readers(graph)
        parent_add = {id(v) for n in graph.nodes if _same_shape_add(n) for v in n.inputs}
    return graph


def _replace(graph: Graph, old: Value, new: Value) -> None:
    if not substitute(graph, old, new):
        raise AssertionError("merge_gemm_sums: the sum's root is a fresh intermediate")
