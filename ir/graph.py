"""The graph IR: Values flow between Nodes; a Graph holds them in topological order."""

from __future__ import annotations

import copy
import itertools
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from kiln import config
from kiln.errors import ElementCapError, GraphError, TypeInferenceError
from kiln.ir.opdef import OpDef, get_op
from kiln.ir.types import TensorType


class Value:
    """An SSA value: produced by one node (or a graph input or parameter), typed."""

    __slots__ = ("name", "type", "producer", "index")

    def __init__(self, name: str, type: TensorType | None, producer: "Node | None" = None, index: int = 0):
        self.name = name
        self.type = type
        self.producer = producer
        self.index = index

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}"


class Node:
    """One op application: ``outputs = op(inputs) {attrs}``. ``name`` says where it came from."""

    __slots__ = ("op", "inputs", "attrs", "outputs", "name")

    def __init__(self, op: OpDef, inputs: Sequence[Value | None], attrs: Mapping[str, Any], name: str):
        self.op = op
        self.inputs: list[Value | None] = list(inputs)
        self.attrs: dict[str, Any] = dict(attrs)
        self.outputs: list[Value] = []
        self.name = name

    def __repr__(self) -> str:
        return f"Node({self.op.name}, {self.name!r})"


def infer_types(op: OpDef, attrs: Mapping[str, Any], inputs: Sequence[Value | None], where: str) -> list[TensorType]:
    """Run ``op``'s shape rule; errors name the node ``where``; results obey the element cap."""
    lo, hi = op.num_inputs
    if len(inputs) < lo or (hi is not None and len(inputs) > hi):
        expected = f"{lo}" if lo == hi else f"{lo}..{hi if hi is not None else 'n'}"
        raise TypeInferenceError(f"node {where!r} ({op.name}): takes {expected} inputs, got {len(inputs)}")
    types = [v.type if v is not None else None for v in inputs]
    try:
        out = op.infer(dict(attrs), types)
    except TypeInferenceError as err:
        raise TypeInferenceError(f"node {where!r} ({op.name}): {err}") from None
    except (ValueError, IndexError, TypeError, KeyError, ZeroDivisionError) as err:
        shapes = ", ".join(str(t) for t in types)
        raise TypeInferenceError(f"node {where!r} ({op.name}) on ({shapes}): {err}") from None
    cap = config.flags().max_elements
    for t in out:
        if t.numel > cap:
            raise ElementCapError(
                f"node {where!r} ({op.name}): output {t} has {t.numel} elements, over the cap of {cap} "
                "(KILN_MAX_ELEMENTS)"
            )
    return out


_NAME_OK = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*$")


class Graph:
    """A dataflow graph: inputs, parameters (numpy arrays), nodes in topological order, outputs.

    Build with ``add_input``, ``add_param`` and ``add_node`` (which infers output types at once);
    ``verify(graph)`` checks the invariants after arbitrary edits.
    """

    def __init__(self, name: str = "main"):
        self.name = name
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self.params: dict[Value, np.ndarray] = {}
        self.nodes: list[Node] = []
        self._names: set[str] = set()
        self._counter = itertools.count()
        self.pass_records: list = []  # filled by the PassManager: what each pass did

    # -- building ---------------------------------------------------------------------------
    def fresh_name(self, hint: str = "") -> str:
        """A value name not yet used in this graph, derived from ``hint`` when given.

        The name is claimed when a value takes it (``add_input``/``add_param``/``add_node``).
        """
        if hint and hint not in self._names:
            return hint
        base = hint or "_"
        while True:
            name = f"{base}{next(self._counter)}"
            if name not in self._names:
                return name

    def _claim(self, name: str) -> str:
        if name in self._names:
            raise GraphError(f"value name {name!r} is defined twice")
        self._names.add(name)
        return name

    def add_input(self, name: str, type: TensorType) -> Value:
        cap = config.flags().max_elements
        if type.numel > cap:
            raise ElementCapError(f"input {name!r}: {type} has {type.numel} elements, over the cap of {cap} (KILN_MAX_ELEMENTS)")
        value = Value(self._claim(name), type)
        self.inputs.append(value)
        return value

    def add_param(self, name: str, array: np.ndarray) -> Value:
        array = np.asarray(array)
        value = Value(self._claim(name), TensorType.of(array))
        self.params[value] = array
        return value

    def add_node(
        self,
        op: OpDef | str,
        inputs: Sequence[Value | None],
        attrs: Mapping[str, Any] | None = None,
        *,
        name: str = "",
        num_outputs: int | None = None,
        output_names: Sequence[str] | None = None,
        index: int | None = None,
    ) -> Node:
        """Add ``op(inputs)`` with inferred output types (at the end, or at position ``index``)."""
        opdef = get_op(op) if isinstance(op, str) else op
        where = name or opdef.name
        try:
            full_attrs = opdef.complete_attrs(attrs or {})
        except TypeInferenceError as err:
            raise TypeInferenceError(f"node {where!r}: {err}") from None
        types = infer_types(opdef, full_attrs, inputs, where)
        count = num_outputs if num_outputs is not None else len(types)
        if count > len(types):
            raise TypeInferenceError(f"node {where!r} ({opdef.name}): asked for {count} outputs, op gives {len(types)}")
        node = Node(opdef, inputs, full_attrs, name)
        names = list(output_names) if output_names is not None else [self.fresh_name() for _ in range(count)]
        for i, (out_name, t) in enumerate(zip(names, types[:count])):
            node.outputs.append(Value(self._claim(out_name), t, node, i))
        self.nodes.insert(len(self.nodes) if index is None else index, node)
        return node

    def forget_name(self, name: str) -> None:
        self._names.discard(name)

    def has_name(self, name: str) -> bool:
        return name in self._names

    def rename(self, value: Value, name: str) -> None:
        """Give ``value`` the unused name ``name``."""
        self._claim(name)
        self._names.discard(value.name)
        value.name = name

    # -- editing (for passes) -------------------------------------------------------------------
    def replace_uses(self, old: Value, new: Value) -> None:
        """Make every reader of ``old`` (nodes and graph outputs) read ``new`` instead."""
        if old.type != new.type:
            raise GraphError(f"cannot replace %{old.name}: {old.type} with %{new.name}: {new.type}")
        for node in self.nodes:
            node.inputs = [new if v is old else v for v in node.inputs]
        self.outputs = [new if v is old else v for v in self.outputs]

    def remove_nodes(self, doomed: Iterable[Node]) -> None:
        """Drop ``doomed`` nodes; their output names become free again."""
        ids = {id(n) for n in doomed}
        for node in self.nodes:
            if id(node) in ids:
                for value in node.outputs:
                    self._names.discard(value.name)
        self.nodes = [n for n in self.nodes if id(n) not in ids]

    def remove_param(self, value: Value) -> None:
        del self.params[value]
        self._names.discard(value.name)

    def remove_unread_params(self) -> None:
        """Drop the parameters that no node and no graph output reads."""
        read = {v for node in self.nodes for v in node.inputs} | set(self.outputs)
        for value in [v for v in self.params if v not in read]:
            self.remove_param(value)

    def copy(self) -> "Graph":
        """A copy of the structure; parameter arrays are shared (passes replace them, never mutate)."""
        g = Graph(self.name)
        new: dict[Value, Value] = {}
        for v in self.inputs:
            new[v] = g.add_input(v.name, v.type)
        for v, array in self.params.items():
            new[v] = g.add_param(v.name, array)
        for node in self.nodes:
            attrs = {k: v.copy() if isinstance(v, Graph) else copy.deepcopy(v) for k, v in node.attrs.items()}
            twin = Node(node.op, [new[v] if v is not None else None for v in node.inputs], attrs, node.name)
            for out in node.outputs:
                new[out] = Value(g._claim(out.name), out.type, twin, out.index)
                twin.outputs.append(new[out])
            g.nodes.append(twin)
        g.outputs = [new[v] for v in self.outputs]
        return g

    # -- queries ----------------------------------------------------------------------------
    def param(self, name: str) -> Value:
        for value in self.params:
            if value.name == name:
                return value
        raise KeyError(name)

    def values(self) -> Iterable[Value]:
        yield from self.inputs
        yield from self.params
        for node in self.nodes:
            yield from node.outputs

    def users(self) -> dict[Value, list[Node]]:
        out: dict[Value, list[Node]] = {}
        for node in self.nodes:
            for v in node.inputs:
                if v is not None:
                    out.setdefault(v, []).append(node)
        return out

    def op_histogram(self) -> dict[str, int]:
        hist: dict[str, int] = {}
        for node in self.nodes:
            hist[node.op.name] = hist.get(node.op.name, 0) + 1
        return dict(sorted(hist.items(), key=lambda kv: (-kv[1], kv[0])))

    @property
    def param_count(self) -> int:
        return sum(int(a.size) for a in self.params.values())

    @property
    def param_bytes(self) -> int:
        return sum(int(a.nbytes) for a in self.params.values())

    def to_text(self) -> str:
        from kiln.ir.text import print_graph

        return print_graph(self)

    def __str__(self) -> str:
        return self.to_text()

    def __repr__(self) -> str:
        return f"Graph({self.name!r}, {len(self.nodes)} nodes)"


def _same_array(x: np.ndarray, y: np.ndarray) -> bool:
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    if x.dtype.kind == "f":
        # NaN payloads do not survive the text form; every other bit (signed zeros too) must
        nan_x, nan_y = np.isnan(x), np.isnan(y)
        return bool(np.array_equal(nan_x, nan_y)) and x[~nan_x].tobytes() == y[~nan_y].tobytes()
    return x.tobytes() == y.tobytes()


def graphs_equal(a: Graph, b: Graph) -> bool:
    """Same text form and equal parameters (bit-identical, NaNs compared as NaN)."""
    if a.to_text() != b.to_text():
        return False
    pa = {v.name: arr for v, arr in a.params.items()}
    pb = {v.name: arr for v, arr in b.params.items()}
    return pa.keys() == pb.keys() and all(_same_array(pa[k], pb[k]) for k in pa)
