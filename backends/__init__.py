"""Backends turn a graph into something that runs: ``get_backend(target).build(graph)``."""

from __future__ import annotations

from kiln.backends.eager import EagerBackend
from kiln.errors import KilnError

def _llvm():
    from kiln.backends.llvm import LLVMBackend

    return LLVMBackend()


def _tvm(kind: str):
    def make(arch: str | None = None, tune: int | None = None):
        from kiln.backends.tvm import TVMBackend

        return TVMBackend(kind, arch, tune)

    return make


BACKENDS = {"eager": EagerBackend, "llvm": _llvm, "tvm-llvm": _tvm("llvm"), "tvm-cuda": _tvm("cuda")}


def get_backend(target: str, arch: str | None = None, tune: int | None = None):
    """The backend for ``target``; KilnError naming the known targets otherwise. ``arch`` picks
    the GPU generation of ``tvm-cuda`` (``sm_90``; default: the GPU present, else sm_90);
    ``tune`` is the number of MetaSchedule trials of the TVM targets."""
    try:
        make = BACKENDS[target]
    except KeyError:
        raise KilnError(f"unknown target {target!r}; available: {', '.join(sorted(BACKENDS))}") from None
    if arch is not None and target != "tvm-cuda":
        raise KilnError(f"--arch applies to target tvm-cuda, not {target!r}")
    if tune is not None:
        if not target.startswith("tvm-"):
            raise KilnError(f"--tune applies to targets tvm-llvm and tvm-cuda, not {target!r}")
        if tune < 1:
            raise KilnError(f"--tune takes a number of trials >= 1, not {tune}")
        return make(arch, tune)
    return make(arch) if arch is not None else make()
