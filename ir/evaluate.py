"""The reference semantics of a graph: run each node's numpy ``eager`` rule in order.

The eager backend runs whole models with this loop; the Fused op runs its body with it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from kiln.errors import KilnError
from kiln.ir.graph import Graph, Value


def last_uses(graph: Graph) -> list[list[Value]]:
    """For each node, the intermediates nothing reads after it (so they can be dropped)."""
    last: dict[Value, int] = {}
    for index, node in enumerate(graph.nodes):
        for value in node.inputs:
            if value is not None:
                last[value] = index
    keep = set(graph.outputs) | set(graph.params) | set(graph.inputs)
    free: list[list[Value]] = [[] for _ in graph.nodes]
    for value, index in last.items():
        if value not in keep:
            free[index].append(value)
    return free


def evaluate(graph: Graph, inputs: Sequence[np.ndarray], free_after: list[list[Value]] | None = None) -> list[np.ndarray]:
    """Outputs of ``graph`` on ``inputs`` (in graph-input order), node by node."""
    env: dict[Value, np.ndarray] = dict(graph.params)
    env.update(zip(graph.inputs, inputs))
    free_after = free_after if free_after is not None else [[] for _ in graph.nodes]
    with np.errstate(all="ignore"):
        for node, dead in zip(graph.nodes, free_after):
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
    return [env[v] for v in graph.outputs]


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
