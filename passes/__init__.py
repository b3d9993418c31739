"""Graph passes: the Pass API, the registry, pipelines and the pattern rewriter.

Write a pass by subclassing ``Pass`` (and ``register_pass``), with ``@graph_pass(name)`` on a
function, or with ``@rewrite_pass(name, pattern)`` from ``kiln.passes.pattern``.
"""

from kiln.passes.base import Pass, PassManager, PassRecord, all_passes, get_pass, graph_pass, register_pass, run_passes

__all__ = ["Pass", "PassManager", "PassRecord", "all_passes", "get_pass", "graph_pass", "register_pass", "run_passes"]
