"""The text form of a graph: printed for people and tests, parsed back to an equal graph.

    graph main(%x: f32[1,4]) {
      param %w: f32[4,2] = dense<sha256:3f2a...>
      param %b: f32[2] = [0.5, -1.0]
      %h: f32[1,2] = Gemm(%x, %w, %b) {alpha=1.0, beta=1.0, transA=0, transB=0} @"fc1"
      %y: f32[1,2] = Relu(%h)
      return %y
    }

Parameters of up to ``INLINE_LIMIT`` elements are printed inline; larger ones by content
hash, and ``parse_graph(text, params=...)`` binds them by name (the hash is checked).
Absent optional inputs print as ``_``; ``@"..."`` is the node's source name.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Mapping

import numpy as np

from kiln.errors import GraphError
from kiln.ir.dtypes import DType
from kiln.ir.graph import Graph, Value
from kiln.ir.opdef import get_op
from kiln.ir.types import TensorType

INLINE_LIMIT = 16
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*$")
_BARE_NAME = re.compile(r"[A-Za-z0-9_.]+")


def array_digest(array: np.ndarray) -> str:
    """SHA-256 over dtype, shape and bytes of ``array``."""
    h = hashlib.sha256()
    h.update(f"{array.dtype.str}{array.shape}".encode())
    h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def _spell(name: str) -> str:
    return "%" + (name if _BARE_NAME.fullmatch(name) else json.dumps(name))


def _json(value: Any) -> str:
    return json.dumps(value, allow_nan=True)


def _param_data(array: np.ndarray) -> str:
    if array.size <= INLINE_LIMIT:
        return _json(array.reshape(-1).tolist())
    return f"dense<sha256:{array_digest(array)}>"


def print_graph(graph: Graph, canonical: bool = False) -> str:
    """The text form of ``graph``.

    ``canonical=True`` renames values by position (parameters ``%c0, %c1, ...`` in order of first
    use, intermediates ``%0, %1, ...``; inputs and outputs keep their names) and leaves out node
    names and graph names (every graph is ``_``), so two graphs that differ only in naming print
    the same: what pass tests compare, and how repeated fused groups share one kernel.
    A graph-valued attribute (a fused group's body) prints as ``<graph>`` and follows its node,
    indented.
    """
    return "\n".join(_graph_lines(graph, canonical, "")) + "\n"


def _graph_lines(graph: Graph, canonical: bool, indent: str) -> list[str]:
    # a nested body's outputs are internal: only the top level keeps its output names
    names = _canonical_names(graph, keep_outputs=not indent) if canonical else {}

    def name(v: Value) -> str:
        return _spell(names.get(v, v.name))

    params = list(graph.params.items())
    if canonical:
        order = {v: i for i, v in enumerate(v for v in names if v in graph.params)}
        params.sort(key=lambda kv: order.get(kv[0], len(order)))
    ins = ", ".join(f"{name(v)}: {v.type}" for v in graph.inputs)
    title = "_" if canonical else graph.name if _IDENT.fullmatch(graph.name) else json.dumps(graph.name)
    lines = [f"{indent}graph {title}({ins}) {{"]
    for value, array in params:
        lines.append(f"{indent}  param {name(value)}: {value.type} = {_param_data(array)}")
    for node in graph.nodes:
        outs = ", ".join(f"{name(v)}: {v.type}" for v in node.outputs)
        args = ", ".join(name(v) if v is not None else "_" for v in node.inputs)
        line = f"{indent}  {outs} = {node.op.name}({args})"
        nested = [v for v in node.attrs.values() if isinstance(v, Graph)]
        if node.attrs:
            shown = ("<graph>" if isinstance(v, Graph) else _json(v) for v in node.attrs.values())
            line += " {" + ", ".join(f"{k}={text}" for k, text in zip(node.attrs, shown)) + "}"
        if node.name and not canonical:
            line += f" @{json.dumps(node.name)}"
        lines.append(line)
        for body in nested:
            lines.extend(_graph_lines(body, canonical, indent + "    "))
    lines.append(f"{indent}  return " + ", ".join(name(v) for v in graph.outputs))
    lines.append(f"{indent}}}")
    return lines


def _canonical_names(graph: Graph, keep_outputs: bool = True) -> dict[Value, str]:
    keep = set(graph.inputs) | (set(graph.outputs) if keep_outputs else set())
    names: dict[Value, str] = {}
    consts = temps = 0
    for node in graph.nodes:
        for v in node.inputs:
            if v is not None and v in graph.params and v not in names and v not in keep:
                names[v] = f"c{consts}"
                consts += 1
        for v in node.outputs:
            if v not in keep:
                names[v] = str(temps)
                temps += 1
    for v in graph.params:
        if v not in names and v not in keep:
            names[v] = f"c{consts}"
            consts += 1
    return names


class _Scanner:
    """Reads one line of the text form token by token; errors say the line and column."""

    _WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
    _SPACE = re.compile(r"\s*")

    def __init__(self, line: str, lineno: int):
        self.s = line
        self.i = 0
        self.lineno = lineno
        self._decoder = json.JSONDecoder()

    def error(self, msg: str) -> GraphError:
        return GraphError(f"line {self.lineno}, column {self.i + 1}: {msg}: {self.s.strip()!r}")

    def skip(self) -> None:
        self.i = self._SPACE.match(self.s, self.i).end()

    def peek(self, text: str) -> bool:
        self.skip()
        return self.s.startswith(text, self.i)

    def accept(self, text: str) -> bool:
        if self.peek(text):
            self.i += len(text)
            return True
        return False

    def expect(self, text: str) -> None:
        if not self.accept(text):
            raise self.error(f"expected {text!r}")

    def word(self) -> str:
        self.skip()
        m = self._WORD.match(self.s, self.i)
        if not m:
            raise self.error("expected a name")
        self.i = m.end()
        return m.group()

    def json_value(self) -> Any:
        self.skip()
        try:
            value, self.i = self._decoder.raw_decode(self.s, self.i)
        except json.JSONDecodeError:
            raise self.error("expected a value") from None
        return value

    def value_name(self) -> str:
        self.expect("%")
        if self.peek('"'):
            return self.json_value()
        m = _BARE_NAME.match(self.s, self.i)
        if not m:
            raise self.error("expected a value name")
        self.i = m.end()
        return m.group()

    def tensor_type(self) -> TensorType:
        dtype = DType.parse(self.word())
        self.expect("[")
        dims: list[int] = []
        while not self.accept("]"):
            if dims:
                self.expect(",")
            self.skip()
            m = re.compile(r"\d+").match(self.s, self.i)
            if not m:
                raise self.error("expected a dimension")
            self.i = m.end()
            dims.append(int(m.group()))
        return TensorType(tuple(dims), dtype)

    def at_end(self) -> bool:
        self.skip()
        return self.i >= len(self.s)


def parse_graph(text: str, params: Mapping[str, np.ndarray] | None = None) -> Graph:
    """Parse the text form back into a Graph (types are re-inferred and must match)."""
    lines = [(n, ln) for n, ln in enumerate(text.splitlines(), 1) if ln.strip() and not ln.strip().startswith("#")]
    if not lines:
        raise GraphError("empty graph text")
    graph, end = _parse_lines(lines, 0, params or {})
    if end != len(lines):
        lineno, line = lines[end]
        raise GraphError(f"line {lineno}: text after the end of the graph: {line.strip()!r}")
    return graph


def _parse_lines(lines: list[tuple[int, str]], pos: int, params: Mapping[str, np.ndarray]) -> tuple[Graph, int]:
    """Parse one graph starting at ``lines[pos]``; returns it and the index after its ``}``."""
    env: dict[str, Value] = {}

    def lookup(sc: _Scanner, name: str) -> Value:
        try:
            return env[name]
        except KeyError:
            raise sc.error(f"value %{name} is used before it is defined") from None

    lineno, header = lines[pos]
    sc = _Scanner(header, lineno)
    sc.expect("graph")
    graph = Graph(sc.json_value() if sc.peek('"') else sc.word())
    sc.expect("(")
    while not sc.accept(")"):
        if graph.inputs:
            sc.expect(",")
        name = sc.value_name()
        sc.expect(":")
        env[name] = graph.add_input(name, sc.tensor_type())
    sc.expect("{")
    pos += 1
    while pos < len(lines):
        lineno, line = lines[pos]
        pos += 1
        sc = _Scanner(line, lineno)
        if sc.accept("}"):
            return graph, pos
        if sc.accept("param "):
            name = sc.value_name()
            env[name] = graph.add_param(name, _parse_param_data(sc, name, params))
            continue
        if sc.accept("return"):
            while not sc.at_end():
                if graph.outputs:
                    sc.expect(",")
                graph.outputs.append(lookup(sc, sc.value_name()))
            continue
        outs: list[tuple[str, TensorType]] = []
        while True:
            name = sc.value_name()
            sc.expect(":")
            outs.append((name, sc.tensor_type()))
            if not sc.accept(","):
                break
        sc.expect("=")
        op = get_op(sc.word())
        sc.expect("(")
        inputs: list[Value | None] = []
        while not sc.accept(")"):
            if inputs:
                sc.expect(",")
            inputs.append(None if sc.accept("_") else lookup(sc, sc.value_name()))
        attrs: dict[str, Any] = {}
        nested: list[str] = []
        if sc.accept("{"):
            while not sc.accept("}"):
                if attrs:
                    sc.expect(",")
                key = sc.word()
                sc.expect("=")
                if sc.accept("<graph>"):
                    nested.append(key)
                    attrs[key] = None
                else:
                    attrs[key] = sc.json_value()
        node_name = sc.json_value() if sc.accept("@") else ""
        if not sc.at_end():
            raise sc.error("unexpected text")
        for key in nested:
            if pos >= len(lines) or not lines[pos][1].strip().startswith("graph"):
                raise sc.error(f"attribute {key} needs its graph on the following lines")
            attrs[key], pos = _parse_lines(lines, pos, params)
        node = graph.add_node(op, inputs, attrs, name=node_name, num_outputs=len(outs), output_names=[n for n, _ in outs])
        for value, (name, declared) in zip(node.outputs, outs):
            if value.type != declared:
                raise sc.error(f"%{name} is declared {declared} but {op.name} infers {value.type}")
            env[name] = value
    raise GraphError(f"line {lines[-1][0]}: the graph is not closed with '}}'")


def _parse_param_data(sc: _Scanner, name: str, params: Mapping[str, np.ndarray]) -> np.ndarray:
    sc.expect(":")
    t = sc.tensor_type()
    sc.expect("=")
    if sc.accept("dense<sha256:"):
        m = re.compile(r"[0-9a-f]{64}").match(sc.s, sc.i)
        if not m:
            raise sc.error("expected a sha256 digest")
        digest, sc.i = m.group(), m.end()
        sc.expect(">")
        if name not in params:
            raise sc.error(f"parameter %{name} is stored by hash; pass its data in params=")
        array = np.asarray(params[name])
        if array_digest(array) != digest:
            raise sc.error(f"parameter %{name}: the data given does not match its hash")
    else:
        array = np.array(sc.json_value(), dtype=t.dtype.numpy).reshape(t.shape)
    if TensorType.of(array) != t:
        raise sc.error(f"parameter %{name} is declared {t} but its data is {TensorType.of(array)}")
    return array
