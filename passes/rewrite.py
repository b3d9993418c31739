"""Editing helpers every pass shares: substituting values without losing output names."""

from __future__ import annotations

from typing import Sequence

from kiln.errors import GraphError
from kiln.ir.graph import Graph, Node, Value


def substitute(graph: Graph, old: Value, new: Value) -> bool:
    """Make readers of ``old`` read ``new``. Returns False when ``old`` must stay.

    A graph output keeps its name: ``new`` takes it over when ``new`` is an intermediate that is
    not an output itself; otherwise (an input, a parameter, another output) nothing changes and
    the caller keeps the node that defines ``old``.
    """
    if old in graph.outputs:
        renameable = new.producer is not None and new not in graph.outputs
        if not renameable:
            return False
        name = old.name
        graph.replace_uses(old, new)
        graph.forget_name(name)
        graph.rename(new, name)
        old.name = f"{name}.replaced"
        return True
    graph.replace_uses(old, new)
    return True


def live_nodes(graph: Graph) -> list[Node]:
    """Nodes that contribute to a graph output, in order."""
    needed = {id(v) for v in graph.outputs}
    keep: list[Node] = []
    for node in reversed(graph.nodes):
        if any(id(v) in needed for v in node.outputs):
            keep.append(node)
            needed.update(id(v) for v in node.inputs if v is not None)
    return keep[::-1]


def replace_node(graph: Graph, node: Node, outputs: Sequence[Value | None], added_from: int) -> None:
    """Put the nodes appended to ``graph`` since ``added_from`` where ``node`` stands, and make
    the readers of ``node``'s outputs read ``outputs`` (one each; None for an output nobody
    reads); then drop ``node``. A graph output keeps its name: where the replacement cannot take
    it over (an input or parameter), an Identity carries it."""
    added = graph.nodes[added_from:]
    del graph.nodes[added_from:]
    index = graph.nodes.index(node)
    graph.nodes[index:index] = added
    after = index + len(added)
    read = {v for n in graph.nodes for v in n.inputs} | set(graph.outputs)
    for old, new in zip(node.outputs, outputs):
        if new is None:
            if old in read:
                raise GraphError(f"node {node.name!r}: its output %{old.name} is read but its replacement gives none")
            continue
        if not substitute(graph, old, new):
            carrier = graph.add_node("Identity", [new], name=f"{node.name}/Identity", index=after).outputs[0]
            after += 1
            substitute(graph, old, carrier)  # an intermediate: it takes the output's name
    graph.remove_nodes([node])
