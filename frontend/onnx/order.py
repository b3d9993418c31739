"""Node order of an ONNX graph: cycles and undefined values reported by name, unsorted graphs sorted."""

from __future__ import annotations

from typing import Iterable

import networkx as nx
import onnx

from kiln.errors import GraphError


def node_label(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}_{index}"


def topological_nodes(graph: onnx.GraphProto, defined: Iterable[str], source: str) -> list[onnx.NodeProto]:
    """``graph``'s nodes in an order where every value is defined before use.

    Already-sorted graphs keep their order. A cycle is reported with the nodes on it; a value
    that nothing defines is reported with the node that reads it.
    """
    nodes = list(graph.node)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    known = set(defined)
    deps = nx.DiGraph()
    deps.add_nodes_from(range(len(nodes)))
    for i, node in enumerate(nodes):
        for value in node.input:
            if not value or value in known and value not in producer:
                continue
            if value not in producer:
                raise GraphError(
                    f"{source}: node {node_label(node, i)!r} ({node.op_type}) reads {value!r}, "
                    "which no node, graph input or initializer defines"
                )
            deps.add_edge(producer[value], i)
    try:
        order = list(nx.lexicographical_topological_sort(deps))
    except nx.NetworkXUnfeasible:
        cycle = nx.find_cycle(deps)
        path = " -> ".join(repr(node_label(nodes[a], a)) for a, _ in cycle) + f" -> {node_label(nodes[cycle[0][0]], cycle[0][0])!r}"
        raise GraphError(f"{source}: the graph has a cycle: {path}") from None
    return [nodes[i] for i in order]
