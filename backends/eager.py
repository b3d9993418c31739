"""The eager backend: runs each node's numpy reference in order. It is the oracle every
compiled backend is tested against, and the "eager" of compiled-vs-eager benchmarks."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from kiln.ir.evaluate import evaluate, last_uses
from kiln.ir.graph import Graph


class EagerExecutable:
    """Interprets ``graph``; intermediates are dropped after their last use."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self._free_after = last_uses(graph)

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        return evaluate(self.graph, inputs, self._free_after)


class EagerBackend:
    """``target="eager"``: no code generation; the artifact carries the graph and parameters."""

    name = "eager"
    default_pipeline = "O0"  # the oracle runs the graph as imported
    preferred_layout = "nchw"
    # every op has its reference: nothing to express through others; the weights' dequantization
    # the importer keeps (for llvm's integer_products) is folded, as the importer used to
    lowering: list[str] = ["fold_dequantized_weights"]

    def build(self, graph: Graph) -> EagerExecutable:
        return EagerExecutable(graph)
