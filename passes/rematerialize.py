"""rematerialize: cheap values read again much later are rebuilt there instead of kept alive.

A value made by an elementwise node and read twice far apart (a training step's forward
activation that its gradient reads again, ``gap`` nodes or more later) is rebuilt just before
the later readers, from values that are alive there anyway (graph inputs, parameters, values
read at or after that point), through at most ``depth`` elementwise nodes. The early copy then
dies with its early readers, so the memory plan can reuse its bytes in between. Run after
common-subexpression elimination (which would merge the copy back) and before fusion (which
makes the rebuilt chain part of its readers' kernels, so it costs a few operations per
element, not a pass over memory).

Preconditions: none. Postconditions: the same outputs; every rebuilt node computes what its
original computes, from the same values.
"""

from __future__ import annotations

from kiln.ir.graph import Graph, Node, Value
from kiln.ir.opdef import OpKind
from kiln.passes.base import Pass, register_pass


class Rematerialize(Pass):
    name = "rematerialize"

    def __init__(self, gap: int = 16, depth: int = 6):
        self.gap, self.depth = gap, depth

    def run(self, graph: Graph) -> Graph:
        reads: dict[Value, list[int]] = {}
        for i, node in enumerate(graph.nodes):
            for x in node.inputs:
                reads.setdefault(x, []).append(i)
        wide = [n.outputs[0] for n in graph.nodes if _cheap(n) and _widest_gap(reads.get(n.outputs[0], []))[0] >= self.gap]
        for v in wide:  # positions move as copies go in: each split looks again
            self._split(graph, v)
        return graph

    def _split(self, graph: Graph, v: Value) -> None:
        width, late = _widest_gap([i for i, n in enumerate(graph.nodes) if any(x is v for x in n.inputs)])
        if width < self.gap or v in graph.outputs:
            return
        last_read = {}
        for i, node in enumerate(graph.nodes):
            for x in node.inputs:
                last_read[x] = i
        for x in graph.outputs:
            last_read[x] = len(graph.nodes)
        producer = {x: n for n in graph.nodes for x in n.outputs}

        def alive(x: Value) -> bool:
            return x not in producer or last_read.get(x, -1) >= late

        plan: list[Node] = []  # the nodes to copy, inputs before readers

        def collect(x: Value, budget: int) -> int | None:
            """Nodes needed to rebuild ``x`` at ``late`` (None: more than ``budget``, or a
            value that is dead there and not cheap to rebuild)."""
            if x is None or alive(x) and x is not v:
                return 0
            node = producer[x]
            if not _cheap(node) or budget == 0:
                return None
            used = 1
            for inp in node.inputs:
                got = collect(inp, budget - used)
                if got is None:
                    return None
                used += got
            if node not in plan:
                plan.append(node)
            return used

        if collect(v, self.depth) is None:
            return
        copies: dict[Value, Value] = {}
        for offset, node in enumerate(plan):
            inputs = [copies.get(x, x) if x is not None else None for x in node.inputs]
            copy = graph.add_node(node.op, inputs, node.attrs, name=f"{node.name or node.op.name}/remat", index=late + offset)
            copies[node.outputs[0]] = copy.outputs[0]
        for node in graph.nodes[late + len(plan) :]:
            node.inputs = [copies[v] if x is v else x for x in node.inputs]


def _widest_gap(positions: list[int]) -> tuple[int, int]:
    """The widest distance between consecutive reads, and where the read after it is."""
    return max(((b - a, b) for a, b in zip(positions, positions[1:])), default=(0, 0))


def _cheap(node: Node) -> bool:
    return node.op.kind == OpKind.ELEMENTWISE and len(node.outputs) == 1 and node.op.deterministic


register_pass(Rematerialize())
