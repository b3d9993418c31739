"""The eager backend: runs each node's numpy reference in order. It is the oracle every
compiled backend is tested against, and the "eager" of compiled-vs-eager benchmarks."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from kiln.errors import KilnError
from kiln.ir.graph import Graph, Value


class EagerExecutable:
    """Interprets ``graph``; intermediates are dropped after their last use."""

    def __init__(self, graph: Graph):
        self.graph = graph
        last_use: dict[Value, int] = {}
        for index, node in enumerate(graph.nodes):
            for value in node.inputs:
                if value is not None:
                    last_use[value] = index
        keep = set(graph.outputs) | set(graph.params) | set(graph.inputs)
        self._free_after: list[list[Value]] = [[] for _ in graph.nodes]
        for value, index in last_use.items():
            if value not in keep:
                self._free_after[index].append(value)

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        env: dict[Value, np.ndarray] = dict(self.graph.params)
        env.update(zip(self.graph.inputs, inputs))
        with np.errstate(all="ignore"):
            for node, dead in zip(self.graph.nodes, self._free_after):
                args = [env[v] if v is not None else None for v in node.inputs]
                try:
                    results = node.op.run_eager(node.attrs, args)
                except KilnError as err:
                    raise KilnError(f"node {node.name or node.op.name!r} ({node.op.name}): {err}") from None
                except (ValueError, IndexError, TypeError, FloatingPointError, MemoryError) as err:
                    raise KilnError(f"node {node.name or node.op.name!r} ({node.op.name}) failed: {err}") from err
                for value, array in zip(node.outputs, results):
                    env[value] = _conform(array, value)
                for value in dead:
                    env.pop(value, None)
        return [env[v] for v in self.graph.outputs]


def _conform(array: np.ndarray, value: Value) -> np.ndarray:
    """The reference must produce exactly the inferred type; a mismatch is a bug in the op."""
    array = np.asarray(array)
    t = value.type
    if array.shape != t.shape or array.dtype != t.dtype.numpy:
        raise KilnError(
            f"value %{value.name}: the op's reference returned {array.dtype}{list(array.shape)}, "
            f"its type says {t} (a bug in the op's eager or infer rule)"
        )
    return array


class EagerBackend:
    """``target="eager"``: no code generation; the artifact carries the graph and parameters."""

    name = "eager"
    default_pipeline = "O0"  # the oracle runs the graph as imported

    def build(self, graph: Graph) -> EagerExecutable:
        return EagerExecutable(graph)
