"""The named pipelines, each one readable list of pass names, in the order they run."""

from __future__ import annotations

from kiln.errors import KilnError
from kiln.passes.canonicalize import CANONICALIZE
from kiln.passes.fold_batchnorm import FOLD_BATCHNORM

PIPELINES: dict[str, list[str]] = {
    # nothing: the graph as imported (what the eager oracle runs by default)
    "O0": [],
    # clean-ups that keep every op: folding, no-op removal, chain folding, CSE, DCE
    "O1": [*CANONICALIZE],
    # everything for inference: canonicalize, fold BatchNorm into conv/gemm, canonicalize again,
    # then fuse into groups (each one kernel for the compiled backends)
    "O2": [*CANONICALIZE, *FOLD_BATCHNORM, *CANONICALIZE, "fuse"],
}


def pipeline(name: str) -> list[str]:
    """The pass names of pipeline ``name`` (``O0``, ``O1``, ``O2``; a leading ``-`` is accepted)."""
    key = name.lstrip("-").upper()
    try:
        return list(PIPELINES[key])
    except KeyError:
        raise KilnError(f"unknown pipeline {name!r}; known: {', '.join(PIPELINES)}") from None
