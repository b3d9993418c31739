"""The compile driver: a model (path, ModelProto, Graph or built-in name) in, a Module out.

It is the one place that joins frontend, verifier, backends and runtime; ``kiln.compile`` and
the CLI call it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx

from kiln.errors import KilnError, ModelLoadError
from kiln.frontend.onnx import import_onnx, load_model
from kiln.ir.graph import Graph
from kiln.ir.verify import verify
from kiln.models import builtin_model_path
from kiln.runtime.module import Module



def resolve_model_path(model: str | os.PathLike) -> Path:
    """A file path, or the path of a built-in model named ``model`` (see ``kiln.models``)."""
    path = Path(model)
    if path.exists():
        return path
    builtin = builtin_model_path(str(model))
    if builtin is not None:
        return builtin
    raise ModelLoadError(f"{model}: no such file, and no built-in model of that name (try `kiln zoo`)")


def to_graph(
    model: "str | os.PathLike | onnx.ModelProto | Graph",
    shapes: Mapping[str, Sequence[int]] | None = None,
    constants: Mapping[str, np.ndarray] | None = None,
) -> Graph:
    """Import ``model`` as a verified kiln Graph."""
    if isinstance(model, Graph):
        if shapes or constants:
            raise KilnError("shapes= and constants= apply to ONNX models; a kiln Graph is already static")
        graph = model
    elif isinstance(model, onnx.ModelProto):
        graph = import_onnx(model, shapes, constants, source=model.graph.name or "model")
    elif isinstance(model, (str, os.PathLike)):
        path = resolve_model_path(model)
        if path.suffix == ".kiln":
            raise KilnError(f"{path}: is a compiled artifact; open it with kiln.load()")
        graph = import_onnx(load_model(path), shapes, constants, source=str(path))
    else:
        raise KilnError(f"cannot compile a {type(model).__name__}: give a path, an onnx.ModelProto or a kiln Graph")
    verify(graph)
    return graph


def compile(
    model: "str | os.PathLike | onnx.ModelProto | Graph",
    target: str = "eager",
    shapes: Mapping[str, Sequence[int]] | None = None,
    constants: Mapping[str, np.ndarray] | None = None,
) -> Module:
    """Compile ``model`` for ``target`` and return a runnable Module.

    ``shapes`` binds symbolic input dims (``{"x": (1, 3, 224, 224)}``); ``constants`` fixes
    inputs to values, which then become parameters.
    """
    return Module(to_graph(model, shapes, constants), target)
