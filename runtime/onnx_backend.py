"""kiln as an ``onnx.backend.base.Backend``: what the ONNX conformance suite drives.

kiln compiles for static shapes and static shape-determining values. A model whose Reshape
shape, Slice starts, TopK k... come from graph inputs is compiled at the first ``run``, with
those inputs bound to the values given, and compiled again whenever they (or an input shape)
change: a JIT with guards on exactly the inputs that decide shapes.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import onnx
from onnx import helper
from onnx.backend.base import Backend, BackendRep

from kiln.errors import NeedsStaticValue


class KilnRep(BackendRep):
    """A prepared model: compiled modules keyed by the static inputs' values and input shapes."""

    def __init__(self, model: onnx.ModelProto, target: str, pipeline: str | None = None, passes: Sequence[str] = ()):
        self.model = model
        self.target = target
        self.pipeline = pipeline
        self.passes = list(passes)  # run after the pipeline (the pass differential test drops one at a time)
        initializers = {t.name for t in model.graph.initializer}
        self.input_names = [i.name for i in model.graph.input if i.name not in initializers]
        self.output_names = [o.name for o in model.graph.output]
        self.static_inputs: set[str] = set()
        self._modules: dict[tuple, Any] = {}

    def _key(self, feeds: dict[str, np.ndarray]) -> tuple:
        shapes = tuple((n, a.dtype.str, a.shape) for n, a in feeds.items())
        values = tuple((n, feeds[n].tobytes()) for n in sorted(self.static_inputs))
        return shapes + values

    def _module(self, feeds: dict[str, np.ndarray]):
        from kiln.driver import compile

        while True:
            key = self._key(feeds)
            if key in self._modules:
                return self._modules[key]
            constants = {n: feeds[n] for n in self.static_inputs}
            shapes = {n: a.shape for n, a in feeds.items() if n not in constants}
            try:
                module = compile(self.model, self.target, shapes=shapes, constants=constants, pipeline=self.pipeline, passes=self.passes)
            except NeedsStaticValue as need:
                fresh = set(need.inputs) - self.static_inputs
                if not fresh:
                    raise
                self.static_inputs |= fresh
                continue
            self._modules[key] = module
            return module

    def _feeds(self, inputs: Any) -> dict[str, np.ndarray]:
        """``inputs`` (a dict, a list in the graph's input order, or one array) by name."""
        if isinstance(inputs, dict):
            return {k: np.asarray(v) for k, v in inputs.items()}
        if isinstance(inputs, np.ndarray):
            inputs = [inputs]
        return {n: np.asarray(a) for n, a in zip(self.input_names, inputs)}

    def module(self, inputs: Any):
        """The compiled Module that runs on ``inputs`` (compiled now unless one already does)."""
        return self._module(self._feeds(inputs))

    def run(self, inputs: Any, **kwargs: Any) -> list[np.ndarray]:
        feeds = self._feeds(inputs)
        module = self._module(feeds)
        outputs = module.run({n: a for n, a in feeds.items() if n not in self.static_inputs})
        return [outputs[n] for n in self.output_names]


class KilnBackend(Backend):
    """``prepare(model, device="CPU", target="eager", pipeline=None)``; CPU only for now.

    ``pipeline`` (``O0``/``O1``/``O2``) defaults to the target's own.
    """

    default_target: str = "eager"
    default_pipeline: str | None = None

    @classmethod
    def prepare(
        cls, model: onnx.ModelProto, device: str = "CPU", target: str | None = None, pipeline: str | None = None, **kwargs: Any
    ) -> KilnRep:
        super().prepare(model, device, **kwargs)
        return KilnRep(model, target or cls.default_target, pipeline or cls.default_pipeline)

    @classmethod
    def run_model(cls, model: onnx.ModelProto, inputs: Any, device: str = "CPU", **kwargs: Any) -> list[np.ndarray]:
        return cls.prepare(model, device, **kwargs).run(inputs)

    @classmethod
    def run_node(
        cls,
        node: onnx.NodeProto,
        inputs: Sequence[np.ndarray],
        device: str = "CPU",
        outputs_info: Sequence[tuple[Any, tuple]] | None = None,
        **kwargs: Any,
    ) -> list[np.ndarray]:
        """Run one node on ``inputs`` (wrapped in a one-node model at the current opset)."""
        arrays = [np.asarray(a) for a in inputs]
        names = [n for n in node.input if n]
        graph_inputs = [
            helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape) for n, a in zip(names, arrays)
        ]
        graph_outputs = [helper.make_empty_tensor_value_info(n) for n in node.output if n]
        graph = helper.make_graph([node], "run_node", graph_inputs, graph_outputs)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", onnx.defs.onnx_opset_version())])
        return cls.prepare(model, device, **kwargs).run(dict(zip(names, arrays)))

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return device.upper() == "CPU"


prepare = KilnBackend.prepare
run_model = KilnBackend.run_model
run_node = KilnBackend.run_node
supports_device = KilnBackend.supports_device

__all__ = ["KilnBackend", "KilnRep", "prepare", "run_model", "run_node", "supports_device"]
