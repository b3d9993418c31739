"""Module: a compiled graph with ``run(inputs) -> outputs``, ``save`` and ``kiln.load``."""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from kiln.backends import get_backend
from kiln.errors import InputError
from kiln.ir.graph import Graph
from kiln.ir.types import TensorType
from kiln.runtime.artifact import Artifact, read_artifact, write_artifact


class Module:
    """A graph built for one target. ``run`` checks names, dtypes and shapes before any work."""

    def __init__(self, graph: Graph, target: str, executable: Any = None):
        self.graph = graph
        self.target = target
        self.executable = executable if executable is not None else get_backend(target).build(graph)
        self.pass_records: list = []

    @property
    def input_types(self) -> dict[str, TensorType]:
        return {v.name: v.type for v in self.graph.inputs}

    @property
    def output_types(self) -> dict[str, TensorType]:
        return {v.name: v.type for v in self.graph.outputs}

    def _check(self, inputs: Mapping[str, Any]) -> list[np.ndarray]:
        if not isinstance(inputs, Mapping):
            raise InputError(f"run() takes a dict of input name -> array, got {type(inputs).__name__}")
        expected = self.input_types
        unknown = sorted(set(inputs) - set(expected))
        missing = [n for n in expected if n not in inputs]
        if unknown or missing:
            parts = []
            if missing:
                parts.append(f"missing input(s) {missing}")
            if unknown:
                parts.append(f"unknown input(s) {unknown}")
            raise InputError("; ".join(parts) + f"; the module takes {self._describe(expected)}")
        arrays = []
        for name, t in expected.items():
            array = np.asarray(inputs[name])
            if array.dtype != t.dtype.numpy:
                raise InputError(
                    f"input {name!r}: expected dtype {t.dtype.numpy} ({t}), got {array.dtype}; "
                    f"convert it with .astype(np.{t.dtype.numpy})"
                )
            if array.shape != t.shape:
                raise InputError(f"input {name!r}: expected shape {list(t.shape)} ({t}), got {list(array.shape)}")
            arrays.append(array)
        return arrays

    @staticmethod
    def _describe(types: Mapping[str, TensorType]) -> str:
        return ", ".join(f"{n}: {t}" for n, t in types.items()) or "no inputs"

    def run(self, inputs: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
        """Run on ``{input name: array}``; returns ``{output name: array}`` (fresh arrays)."""
        arrays = self._check(inputs or {})
        results = self.executable.run(arrays)
        fresh = getattr(self.executable, "fresh_outputs", False)  # already copies nobody else holds
        return {v.name: r if fresh else np.array(r, copy=True) for v, r in zip(self.graph.outputs, results)}

    def save(self, path: str | os.PathLike) -> None:
        """Write this module as one .kiln artifact (atomic)."""
        code = getattr(self.executable, "code", lambda: {})()
        write_artifact(path, Artifact(self.graph, self.target, code))

    def __repr__(self) -> str:
        return (
            f"Module(target={self.target!r}, inputs=[{self._describe(self.input_types)}], "
            f"outputs=[{self._describe(self.output_types)}], nodes={len(self.graph.nodes)})"
        )


def load(path: str | os.PathLike) -> Module:
    """Load a .kiln artifact written by ``Module.save`` without compiling again."""
    artifact = read_artifact(path)
    backend = get_backend(artifact.target)
    loader = getattr(backend, "load", None)
    executable = loader(artifact) if loader else backend.build(artifact.graph)
    return Module(artifact.graph, artifact.target, executable)
