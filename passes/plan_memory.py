"""plan_memory: every intermediate gets an offset in one arena, from liveness over the schedule.

The schedule is the graph's node order. A value is live from the node that defines it to the
last node that reads it (graph outputs: to the end). Elementwise ops write in place over an
input that dies at that node and has their output's shape, so the two share one buffer.
Outputs that are the same bytes as a part of their input (a Reshape, a Split into contiguous
chunks) are views: they live in the input's buffer at their byte offset, the buffer lives as
long as any of them, and the node needs no kernel (``MemoryPlan.is_view``). Where the backend
says which readers take any strides (``strided_readers``), a Split along an inner axis whose
parts only such nodes read is a view too: each part at its offset, with the input's strides
(``MemoryPlan.strides``; an LSTM step's four gates, read by the fused gate kernel).
Buffers are placed largest first, each at the best-fitting gap among the buffers it is live
with (greedy by size, best fit). ``check_plan`` proves that no two buffers that are live at
the same time overlap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from kiln.errors import GraphError
from kiln.ir.graph import Graph, Node, Value
from kiln.ir.opdef import OpKind
from kiln.ir.types import contiguous_strides
from kiln.passes.base import graph_pass

ALIGNMENT = 64


def _aligned(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


@dataclass
class Buffer:
    """One arena slot: the values sharing it (in-place chains), its bytes and live range."""

    values: list[Value]
    size: int
    start: int
    end: int
    offset: int = -1


@dataclass
class MemoryPlan:
    buffers: list[Buffer] = field(default_factory=list)
    arena_bytes: int = 0
    naive_bytes: int = 0
    lower_bound_bytes: int = 0
    views: dict[int, int] = field(default_factory=dict)  # id(view value) -> its byte offset in its buffer
    strides: dict[int, tuple[int, ...]] = field(default_factory=dict)  # id(strided view) -> its element strides
    external: set[int] = field(default_factory=set)  # ids of outputs stored outside the arena

    def offset(self, value: Value) -> int:
        for buf in self.buffers:
            if any(v is value for v in buf.values):
                return buf.offset + self.views.get(id(value), 0)
        raise KeyError(value.name)

    def offsets(self) -> dict[int, int]:
        """id(value) -> its byte offset in the arena, for every value the plan places."""
        return {id(v): buf.offset + self.views.get(id(v), 0) for buf in self.buffers for v in buf.values}

    def is_view(self, value: Value) -> bool:
        return id(value) in self.views

    def summary(self) -> dict[str, int]:
        return {
            "naive_bytes": self.naive_bytes,
            "planned_bytes": self.arena_bytes,
            "lower_bound_bytes": self.lower_bound_bytes,
        }


def _liveness(graph: Graph) -> tuple[dict[int, int], dict[int, int]]:
    """Defining node index and last reading node index of each node output (by id)."""
    define: dict[int, int] = {}
    last: dict[int, int] = {}
    for i, node in enumerate(graph.nodes):
        for v in node.outputs:
            define[id(v)] = last[id(v)] = i
        for v in node.inputs:
            if v is not None and id(v) in define:
                last[id(v)] = max(last[id(v)], i)
    end = len(graph.nodes)
    for v in graph.outputs:
        if id(v) in define:
            last[id(v)] = end
    return define, last


def plan_memory(
    graph: Graph,
    in_place: bool = True,
    guard: int = 0,
    external: frozenset[int] = frozenset(),
    strided_readers: Callable[[Node], bool] | None = None,
) -> MemoryPlan:
    """Assign arena offsets to every node output of ``graph`` (see the module docstring), but
    those in ``external`` (ids of outputs stored outside the arena: donated inputs' arrays).

    ``guard`` bytes are reserved after every buffer (the bounds-checked build fills and checks
    them around each kernel). ``strided_readers(node)``: whether ``node``'s kernel reads inputs
    of any strides (then Splits along inner axes that only such nodes read are views)."""
    define, last = _liveness(graph)
    outputs = {id(v) for v in graph.outputs}
    users = graph.users() if strided_readers is not None else {}
    group: dict[int, Buffer] = {}
    buffers: list[Buffer] = []
    views: dict[int, int] = {}
    strided: dict[int, tuple[int, ...]] = {}
    for i, node in enumerate(graph.nodes):
        source = node.inputs[0] if node.inputs else None
        parts = view_offsets(node) if in_place and source is not None and id(source) in group else None
        if parts is None and in_place and source is not None and id(source) in group and id(source) not in strided and strided_readers is not None:
            parts = _strided_parts(node, users, outputs, strided_readers)
            if parts is not None:
                strided.update({id(out): tuple(contiguous_strides(source.type.shape)) for out in node.outputs})
        for k, out in enumerate(node.outputs):
            if id(out) in external:
                continue
            if parts is not None and id(out) not in outputs:  # a view: no bytes of its own
                buf = group[id(source)]
                buf.values.append(out)
                buf.end = max(buf.end, last[id(out)])
                views[id(out)] = views.get(id(source), 0) + parts[k]
                group[id(out)] = buf
                continue
            donor = None
            if in_place and node.op.kind is OpKind.ELEMENTWISE:
                for v in node.inputs:
                    if (
                        v is not None
                        and id(v) in group
                        and id(v) not in views  # a view's bytes belong to its whole buffer
                        and id(v) not in outputs
                        and last[id(v)] == i
                        and v.type.shape == out.type.shape
                        and v.type.nbytes == out.type.nbytes
                        and group[id(v)].end == i  # nothing else in the chain is read later
                    ):
                        donor = group[id(v)]
                        break
            if donor is not None:
                donor.values.append(out)
                donor.end = last[id(out)]
                group.pop(id(v))  # the input hosts one output; it cannot donate again
                group[id(out)] = donor
            else:
                buf = Buffer([out], out.type.nbytes + guard, define[id(out)], last[id(out)])
                buffers.append(buf)
                group[id(out)] = buf
    _place(buffers)
    plan = MemoryPlan(buffers, views=views, strides=strided, external=set(external))
    plan.arena_bytes = max((b.offset + _aligned(b.size) for b in buffers), default=0)
    plan.naive_bytes = sum(v.type.nbytes for node in graph.nodes for v in node.outputs)
    plan.lower_bound_bytes = _largest_live_set(buffers, len(graph.nodes))
    return plan


SAME_BYTES = {"Reshape", "Identity", "Flatten", "Squeeze", "Unsqueeze"}


def view_offsets(node) -> list[int] | None:
    """Where each output of ``node`` lies in its input's bytes, when every output is a plain
    part of them: a Reshape and its kin (offset 0), a Slice that keeps one contiguous run
    (``_contiguous_slice``), or a Split whose axis has only size-1 dims before it (contiguous
    chunks). None otherwise."""
    if node.op.name in SAME_BYTES:
        return [0]
    if node.op.name == "Slice" and node.inputs[0] is not None:
        at = _contiguous_slice(node)
        return None if at is None else [at]
    if node.op.name != "Split" or node.inputs[0] is None:
        return None
    shape = node.inputs[0].type.shape
    axis = node.attrs["axis"] % len(shape)
    if any(d != 1 for d in shape[:axis]):
        return None
    offsets, at = [], 0
    for out in node.outputs:
        offsets.append(at)
        at += out.type.nbytes
    return offsets


def _contiguous_slice(node) -> int | None:
    """The byte offset of a Slice's output in its input where the output is one contiguous
    run of it: unit steps, size-1 output dims before the one sliced axis that keeps several
    elements, and every dim after that one whole."""
    from kiln.ir.ops.shape import _slices

    shape, out = node.inputs[0].type.shape, node.outputs[0].type.shape
    if 0 in out:
        return None
    kept = [range(d)[s] for d, s in zip(shape, _slices(node.attrs, shape))]  # none empty
    if any(r.step != 1 for r in kept):
        return None
    wide = [a for a, d in enumerate(out) if d != 1]
    if wide and any(out[a] != shape[a] for a in range(wide[0] + 1, len(shape))):
        return None
    return sum(r.start * stride for r, stride in zip(kept, contiguous_strides(shape))) * node.inputs[0].type.dtype.itemsize


def _strided_parts(node: Node, users: dict, outputs: set[int], strided_readers: Callable[[Node], bool]) -> list[int] | None:
    """Where each part of a Split along an inner axis starts in its input's bytes, when every
    part is read, only by nodes that take any strides, and none is a graph output."""
    if node.op.name != "Split" or node.inputs[0] is None:
        return None
    shape = node.inputs[0].type.shape
    axis = node.attrs["axis"] % len(shape)
    if any(id(out) in outputs or not users.get(out) or not all(strided_readers(u) for u in users[out]) for out in node.outputs):
        return None
    inner = math.prod(shape[axis + 1 :]) * node.inputs[0].type.dtype.itemsize
    offsets, at = [], 0
    for out in node.outputs:
        offsets.append(at * inner)
        at += out.type.shape[axis]
    return offsets


def _place(buffers: list[Buffer]) -> None:
    placed: list[Buffer] = []
    for buf in sorted(buffers, key=lambda b: (-b.size, b.start)):
        live = sorted((p for p in placed if p.start <= buf.end and buf.start <= p.end), key=lambda p: p.offset)
        best, best_gap, cursor = None, None, 0
        need = _aligned(buf.size)
        for p in live:
            gap = p.offset - cursor
            if gap >= need and (best_gap is None or gap < best_gap):
                best, best_gap = cursor, gap
            cursor = max(cursor, p.offset + _aligned(p.size))
        buf.offset = best if best is not None else cursor
        placed.append(buf)


def _largest_live_set(buffers: list[Buffer], steps: int) -> int:
    live = [0] * (steps + 1)
    for b in buffers:
        for t in range(b.start, b.end + 1):
            live[t] += b.size
    return max(live, default=0)


def check_plan(graph: Graph, plan: MemoryPlan) -> None:
    """Raise GraphError if two buffers live at the same time overlap, or a value has no slot."""
    planned = {id(v) for b in plan.buffers for v in b.values}
    missing = [v.name for n in graph.nodes for v in n.outputs if id(v) not in planned and id(v) not in plan.external]
    if missing:
        raise GraphError(f"memory plan: values without a slot: {missing[:5]}")
    ordered = sorted(plan.buffers, key=lambda b: b.start)
    for i, a in enumerate(ordered):
        for b in ordered[i + 1 :]:
            if b.start > a.end:
                break
            if a.offset < b.offset + b.size and b.offset < a.offset + a.size:
                raise GraphError(
                    f"memory plan: %{a.values[0].name} [{a.offset}, {a.offset + a.size}) and %{b.values[0].name} "
                    f"[{b.offset}, {b.offset + b.size}) overlap while both are live"
                )
        if a.offset + a.size > plan.arena_bytes:
            raise GraphError(f"memory plan: %{a.values[0].name} ends past the arena")


@graph_pass("plan_memory")
def plan_memory_pass(graph: Graph) -> Graph:
    """Attach ``graph.memory_plan`` (a MemoryPlan over the current node order); the graph is unchanged."""
    graph.memory_plan = plan_memory(graph)
    check_plan(graph, graph.memory_plan)
    return graph
