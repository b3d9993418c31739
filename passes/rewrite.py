"""Editing helpers every pass shares: substituting values without losing output names."""

from __future__ import annotations

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
