"""Backends turn a graph into something that runs: ``get_backend(target).build(graph)``."""

from __future__ import annotations

from kiln.backends.eager import EagerBackend
from kiln.errors import KilnError

def _llvm():
    from kiln.backends.llvm import LLVMBackend

    return LLVMBackend()


BACKENDS = {"eager": EagerBackend, "llvm": _llvm}


def get_backend(target: str):
    """The backend for ``target``; KilnError naming the known targets otherwise."""
    try:
        make = BACKENDS[target]
    except KeyError:
        raise KilnError(f"unknown target {target!r}; available: {', '.join(sorted(BACKENDS))}") from None
    return make()
