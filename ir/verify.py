"""verify(graph): the IR's invariants, checked after every pass in tests and with KILN_VERIFY=1."""

from __future__ import annotations

from kiln.errors import GraphError
from kiln.ir.graph import Graph, Value, infer_types
from kiln.ir.opdef import get_op


def verify(graph: Graph) -> None:
    """Raise GraphError unless ``graph`` is well formed.

    Checks: every op is registered; values are defined once (SSA) and before use (topological
    order); producers and output indices are consistent; attributes are complete; re-running
    each op's shape rule gives the recorded types; outputs are defined.
    """
    defined: set[int] = set()
    names: set[str] = set()

    def define(value: Value, where: str) -> None:
        if id(value) in defined:
            raise GraphError(f"{where}: value %{value.name} is defined twice")
        if value.name in names:
            raise GraphError(f"{where}: value name %{value.name} is used by two values")
        if value.type is None:
            raise GraphError(f"{where}: value %{value.name} has no type")
        defined.add(id(value))
        names.add(value.name)

    for value in graph.inputs:
        define(value, "graph input")
    for value in graph.params:
        define(value, "parameter")
        if value.type.shape != graph.params[value].shape:
            raise GraphError(f"parameter %{value.name}: type {value.type} but data shape {graph.params[value].shape}")

    for node in graph.nodes:
        where = f"node {node.name or node.op.name!r} ({node.op.name})"
        if get_op(node.op.name) is not node.op:
            raise GraphError(f"{where}: op is not the registered {node.op.name}")
        for i, value in enumerate(node.inputs):
            if value is not None and id(value) not in defined:
                raise GraphError(f"{where}: input {i} %{value.name} is not defined before this node (cycle or bad order)")
        if node.op.complete_attrs(node.attrs) != node.attrs:
            raise GraphError(f"{where}: attributes are incomplete")
        expected = infer_types(node.op, node.attrs, node.inputs, node.name or node.op.name)
        if len(node.outputs) > len(expected) or not node.outputs:
            raise GraphError(f"{where}: has {len(node.outputs)} outputs, op gives {len(expected)}")
        for i, (value, t) in enumerate(zip(node.outputs, expected)):
            if value.producer is not node or value.index != i:
                raise GraphError(f"{where}: output %{value.name} does not point back to its node")
            if value.type != t:
                raise GraphError(f"{where}: output %{value.name} is {value.type} but the op infers {t}")
            define(value, where)

    if not graph.outputs:
        raise GraphError("graph has no outputs")
    for value in graph.outputs:
        if id(value) not in defined:
            raise GraphError(f"graph output %{value.name} is not defined")
