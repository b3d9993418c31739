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
from kiln.frontend.dsl.module import Module as DSLModule
from kiln.frontend.dsl.trace import trace
from kiln.frontend.onnx import import_onnx, load_model
from kiln.ir.graph import Graph
from kiln.ir.verify import verify
from kiln.models import ZOO, builtin_model_path
from kiln.backends import get_backend
from kiln.passes.base import Pass, PassManager
from kiln.passes.pipelines import pipeline as pipeline_passes
from kiln.runtime.module import Module



def resolve_model(model: str | os.PathLike, shapes: Mapping[str, Sequence[int]] | None = None) -> "Path | onnx.ModelProto":
    """A file path; or for a zoo name, its ONNX export at ``shapes`` (``{"input": (...)}``);
    or the path of a light ONNX net of that name (see ``kiln zoo``)."""
    path = Path(model)
    if path.exists():
        return path
    if str(model) in ZOO:
        from kiln.models.zoo import zoo_onnx

        return zoo_onnx(str(model), shapes)
    builtin = builtin_model_path(str(model))
    if builtin is not None:
        return builtin
    raise ModelLoadError(f"{model}: no such file, and no zoo model of that name (try `kiln zoo`)")


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
        path = resolve_model(model, shapes)
        if isinstance(path, onnx.ModelProto):  # a zoo model, exported at the requested shape
            return to_graph(path, None, constants)
        if path.suffix == ".kiln":
            raise KilnError(f"{path}: is a compiled artifact; open it with kiln.load()")
        graph = import_onnx(load_model(path), shapes, constants, source=str(path))
    elif isinstance(model, DSLModule):
        if not shapes:
            raise KilnError("compiling a kiln.nn.Module needs shapes={input name: shape} (float32 inputs), or trace it with kiln.trace")
        examples = [np.zeros(tuple(shape), np.float32) for shape in shapes.values()]
        graph = trace(model, examples, input_names=list(shapes))
    else:
        raise KilnError(f"cannot compile a {type(model).__name__}: give a path, a zoo name, an onnx.ModelProto, a kiln.nn.Module or a kiln Graph")
    verify(graph)
    return graph


def optimize(
    model: "str | os.PathLike | onnx.ModelProto | Graph",
    pipeline: str = "O2",
    passes: Sequence["str | Pass"] = (),
    shapes: Mapping[str, Sequence[int]] | None = None,
    constants: Mapping[str, np.ndarray] | None = None,
    dump_ir: str | os.PathLike | None = None,
    lowering: Sequence["str | Pass"] = (),
    layout: str = "nchw",
    recompute: bool = False,
) -> Graph:
    """Import ``model`` and run ``lowering``, ``pipeline`` (``O0``/``O1``/``O2``) then ``passes``.

    ``layout`` (``nchw``/``nhwc``/``auto``) converts convolutions and pools to that data layout
    (-O2); ``auto`` chooses channels-last where the convolution work is in wide layers.
    ``recompute`` rebuilds cheap values read again much later instead of keeping them (-O2).
    A Graph given as ``model`` is copied first, never edited. ``dump_ir`` writes the IR before
    and after each pass into that folder. The pass records are on ``graph.pass_records``.
    """
    graph = to_graph(model, shapes, constants)
    if isinstance(model, Graph):
        graph = graph.copy()
    manager = PassManager([*lowering, *pipeline_passes(pipeline, layout, recompute), *passes], Path(dump_ir) if dump_ir is not None else None)
    graph = manager.run(graph)
    graph.pass_records = manager.records
    return graph


def compile(
    model: "str | os.PathLike | onnx.ModelProto | Graph",
    target: str = "eager",
    shapes: Mapping[str, Sequence[int]] | None = None,
    constants: Mapping[str, np.ndarray] | None = None,
    pipeline: str | None = None,
    passes: Sequence["str | Pass"] = (),
    dump_ir: str | os.PathLike | None = None,
    layout: str = "auto",
    arch: str | None = None,
    tune: int | None = None,
    recompute: bool = False,
    donate: Mapping[str, str] | None = None,
) -> Module:
    """Compile ``model`` for ``target`` and return a runnable Module.

    ``shapes`` binds symbolic input dims (``{"x": (1, 3, 224, 224)}``); ``constants`` fixes
    inputs to values, which then become parameters. ``pipeline`` defaults to the backend's
    (``O0`` for eager, which is the unoptimized oracle); ``passes`` run after it. ``arch`` is
    the GPU generation of ``tvm-cuda`` (``sm_90``...); ``tune`` tunes the kernels of the TVM
    targets with MetaSchedule, with that many trials (records kept in the cache). ``recompute`` trades arithmetic for
    memory: cheap values read again much later (a training step's activations, read by their
    gradients) are rebuilt where they are read again (-O2's ``rematerialize``). ``donate``
    maps output names to input names whose arrays the outputs may be written over (a training
    step's next parameters over the current ones): where the llvm target finds that safe, the
    output is computed in place and ``run`` returns the input's array, now holding it; other
    targets return the output as usual.
    """
    backend = get_backend(target, arch, tune)
    chosen_pipeline = pipeline or backend.default_pipeline
    if layout == "auto":  # the backend's preference, where the pipeline converts layouts at all
        layout = backend.preferred_layout if chosen_pipeline.lstrip("-").upper() == "O2" else "nchw"
    graph = optimize(model, chosen_pipeline, passes, shapes, constants, dump_ir, backend.lowering, layout, recompute)
    if donate:
        known_in, known_out = {v.name for v in graph.inputs}, {v.name for v in graph.outputs}
        bad = sorted(f"{o} -> {i}" for o, i in donate.items() if o not in known_out or i not in known_in)
        if bad:
            raise KilnError(f"donate: no such output -> input pair(s): {', '.join(bad)}")
        graph.donations = dict(donate)
    module = Module(graph, target, backend.build(graph))
    module.pass_records = graph.pass_records
    return module
