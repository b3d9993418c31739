"""The pattern rewriter: match a small DAG of ops, capture its parts, emit a replacement.

    from kiln.passes.pattern import Op, Var, Const, Maybe, rewrite_pass

    conv_bn = Op("BatchNormalization",
                 Op("Conv", Var("x"), Const("w"), Maybe(Const("b")), name="conv"),
                 Const("scale"), Const("shift"), Const("mean"), Const("var"),
                 name="bn", where=lambda m: not m.node("bn").attrs["training_mode"])

    @rewrite_pass("fold_my_bn", conv_bn)
    def fold(m, emit):
        ...                                    # m.value("x"), m.array("w"), m.node("conv").attrs
        return emit.op("Conv", [m.value("x"), emit.const(w2), emit.const(b2)], m.node("conv").attrs)

The rewrite gets the match and an emitter; what it returns replaces the pattern's root (its
first output, or all outputs for a list). Returning None declines the match. Intermediate
values of a match must have no readers outside it, so nothing is computed twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from kiln.ir.graph import Graph, Node, Value
from kiln.passes.base import FunctionPass, register_pass
from kiln.passes.rewrite import substitute

Predicate = Callable[["Match"], bool]


class Pattern:
    """Base of pattern nodes."""


@dataclass(frozen=True, eq=False)
class Var(Pattern):
    """Any value; the same name twice must bind the same value."""

    name: str


@dataclass(frozen=True, eq=False)
class Const(Pattern):
    """A compile-time constant: a parameter, or the output of a node with no inputs (such as a
    ConstantOfShape splat left unfolded for size); its array is ``match.array(name)``."""

    name: str


def is_constant(graph: Graph, value: Value) -> bool:
    node = value.producer
    return value in graph.params or (node is not None and node.op.deterministic and not any(node.inputs))


def constant_value(graph: Graph, value: Value) -> np.ndarray:
    if value in graph.params:
        return graph.params[value]
    node = value.producer
    return node.op.run_eager(node.attrs, node.inputs)[value.index]


@dataclass(frozen=True, eq=False)
class Maybe(Pattern):
    """``inner``, or an absent optional input (then ``match.value(name)`` is None)."""

    inner: Pattern


@dataclass(frozen=True, eq=False)
class Op(Pattern):
    """Output ``output`` of a node running ``op`` whose inputs match ``inputs`` (in order; a node
    with more inputs than patterns only matches if the extra ones are absent)."""

    op: str
    inputs: tuple[Pattern, ...] = ()
    name: str | None = None
    where: Predicate | None = None
    output: int = 0

    def __init__(self, op: str, *inputs: Pattern, name: str | None = None, where: Predicate | None = None, output: int = 0):
        object.__setattr__(self, "op", op)
        object.__setattr__(self, "inputs", tuple(inputs))
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "where", where)
        object.__setattr__(self, "output", output)


@dataclass
class Match:
    """Captured values, parameters and nodes of one match."""

    graph: Graph
    values: dict[str, Value | None] = field(default_factory=dict)
    nodes: dict[str, Node] = field(default_factory=dict)
    matched: list[Node] = field(default_factory=list)

    def value(self, name: str) -> Value | None:
        return self.values[name]

    def array(self, name: str) -> np.ndarray | None:
        v = self.values[name]
        return None if v is None else constant_value(self.graph, v)

    def node(self, name: str) -> Node:
        return self.nodes[name]


def _match(pattern: Pattern, value: Value | None, m: Match) -> bool:
    if isinstance(pattern, Maybe):
        if value is None:
            inner = pattern.inner
            if isinstance(inner, (Var, Const)):
                m.values[inner.name] = None
            return True
        return _match(pattern.inner, value, m)
    if value is None:
        return False
    if isinstance(pattern, Var):
        bound = m.values.get(pattern.name, value)
        m.values[pattern.name] = value
        return bound is value
    if isinstance(pattern, Const):
        if not is_constant(m.graph, value):
            return False
        m.values[pattern.name] = value
        return True
    assert isinstance(pattern, Op)
    node = value.producer
    if node is None or node.op.name != pattern.op or value.index != pattern.output:
        return False
    if any(v is not None for v in node.inputs[len(pattern.inputs) :]):
        return False
    inputs = list(node.inputs) + [None] * (len(pattern.inputs) - len(node.inputs))  # absent trailing inputs
    for sub, inp in zip(pattern.inputs, inputs):
        if not _match(sub, inp, m):
            return False
    if pattern.name:
        m.nodes[pattern.name] = node
    m.matched.append(node)
    return pattern.where is None or pattern.where(m)


class Emitter:
    """Builds replacement nodes just before the matched root."""

    def __init__(self, graph: Graph, root: Node):
        self.graph = graph
        self.root = root

    def op(self, op: str, inputs: Sequence[Value | None], attrs: dict | None = None, num_outputs: int | None = None) -> Value | list[Value]:
        index = self.graph.nodes.index(self.root)
        node = self.graph.add_node(op, inputs, attrs or {}, name=self.root.name, num_outputs=num_outputs, index=index)
        return node.outputs[0] if len(node.outputs) == 1 else node.outputs

    def const(self, array: Any, like: Value | None = None) -> Value:
        array = np.asarray(array, dtype=like.type.dtype.numpy if like is not None else None)
        return self.graph.add_param(self.graph.fresh_name("_folded"), array)


Rewrite = Callable[[Match, Emitter], "Value | list[Value] | None"]


def _private(m: Match, graph: Graph, root: Node) -> bool:
    """True when no value inside the match (other than the root's) is read from outside it."""
    inside = {id(n) for n in m.matched}
    users = graph.users()
    for node in m.matched:
        if node is root:
            continue
        for out in node.outputs:
            if out in graph.outputs or any(id(u) not in inside for u in users.get(out, [])):
                return False
    return True


def apply_rewrite(graph: Graph, pattern: Op, rewrite: Rewrite, max_rounds: int = 8) -> int:
    """Rewrite every match of ``pattern`` (repeating while anything changes); returns the count."""
    from kiln.passes.canonicalize import eliminate_dead_code

    total = 0
    for _ in range(max_rounds):
        changed = 0
        for root in list(graph.nodes):
            if root not in graph.nodes or len(root.outputs) <= pattern.output:
                continue
            m = Match(graph)
            if not _match(pattern, root.outputs[pattern.output], m) or not _private(m, graph, root):
                continue
            result = rewrite(m, Emitter(graph, root))
            if result is None:
                continue
            new = [result] if isinstance(result, Value) else list(result)
            if all(substitute(graph, old, rep) for old, rep in zip(root.outputs, new)):
                changed += 1
        eliminate_dead_code(graph)
        total += changed
        if not changed:
            break
    return total


def rewrite_pass(name: str, pattern: Op, doc: str = "") -> Callable[[Rewrite], FunctionPass]:
    """Decorator: register ``rewrite`` applied to every match of ``pattern`` as the pass ``name``."""

    def wrap(rewrite: Rewrite) -> FunctionPass:
        p = FunctionPass(name, lambda g: (apply_rewrite(g, pattern, rewrite), g)[1], doc or rewrite.__doc__ or "")
        register_pass(p)
        return p

    return wrap
