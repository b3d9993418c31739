"""``kiln.trace`` (DSL code -> Graph) and ``@kiln.jit`` (trace once per input signature, run compiled)."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Sequence

import numpy as np

from kiln.errors import KilnError
from kiln.frontend.dsl.module import Module
from kiln.frontend.dsl.tensor import Tensor, Tracer, _error, tracing
from kiln.ir.graph import Graph, Value
from kiln.ir.verify import verify


def _example_tensors(example_inputs: Any) -> list[Tensor]:
    items = example_inputs if isinstance(example_inputs, (tuple, list)) else [example_inputs]
    return [x if isinstance(x, Tensor) else Tensor(x) for x in items]


def _input_names(fn: Callable, count: int) -> list[str]:
    target = fn.forward if isinstance(fn, Module) else fn
    try:
        params = [
            p.name for p in inspect.signature(target).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        params = []
    if len(params) >= count:
        return params[:count]
    return ["input"] if count == 1 else [f"input{i}" for i in range(count)]


def _flatten(result: Any, where: str) -> list[Tensor]:
    if isinstance(result, Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        return [t for item in result for t in _flatten(item, where)]
    raise KilnError(f"{where}: returned a {type(result).__name__}; a traced function returns tensors (or tuples/lists of them)")


def trace(fn: Callable | Module, example_inputs: Any, input_names: Sequence[str] | None = None, name: str | None = None) -> Graph:
    """Run ``fn`` on symbolic tensors shaped like ``example_inputs`` and return the graph it builds.

    A Module's parameters and buffers become graph parameters under their ``state_dict`` names;
    other arrays the code uses become constants. Inputs are named after ``fn``'s (or
    ``forward``'s) parameters unless ``input_names`` is given; outputs are ``output`` (one) or
    ``output0``, ``output1``... Tracing records one path through the Python code: control flow
    may depend on shapes, never on values.
    """
    examples = _example_tensors(example_inputs)
    names = list(input_names) if input_names is not None else _input_names(fn, len(examples))
    if len(names) != len(examples):
        raise KilnError(f"trace: {len(names)} input names for {len(examples)} example inputs")
    label = name or (type(fn).__name__ if isinstance(fn, Module) else getattr(fn, "__name__", "main"))
    tracer = Tracer(label if label.isidentifier() else "main")
    graph = tracer.graph
    if isinstance(fn, Module):
        fn.name_submodules()
        for pname, p in [*fn.named_parameters(), *fn.named_buffers()]:
            tracer.bind(p, pname)
    symbols = [Tensor(_value=graph.add_input(n, t.type)) for n, t in zip(names, examples)]
    with tracing(tracer):
        result = fn(*symbols)
    outputs = _flatten(result, label)
    out_names = ["output"] if len(outputs) == 1 else [f"output{i}" for i in range(len(outputs))]
    for tensor, out_name in zip(outputs, out_names):
        graph.outputs.append(_as_output(graph, tracer.value_of(tensor), out_name))
    graph.remove_unread_params()
    verify(graph)
    return graph


def _as_output(graph: Graph, value: Value, name: str) -> Value:
    fresh = value.producer is not None and value not in graph.outputs and not graph.has_name(name)
    if fresh and value.name.startswith("_"):
        graph.rename(value, name)
        return value
    return graph.add_node("Identity", [value], name=name, output_names=[graph.fresh_name(name)]).outputs[0]


class Jitted:
    """A function traced on first call and compiled; traced again when the input signature changes.

    Parameters are captured when a signature is traced: after changing a module's weights,
    call ``clear()`` so the next call traces them anew.
    """

    def __init__(self, fn: Callable, target: str, pipeline: str | None):
        self.fn, self.target, self.pipeline = fn, target, pipeline
        self.cache: dict[tuple, tuple[Any, list[str]]] = {}
        functools.update_wrapper(self, fn if not isinstance(fn, Module) else fn.forward)

    def clear(self) -> None:
        self.cache.clear()

    def __call__(self, *args: Any) -> Any:
        from kiln.driver import compile as compile_graph

        tensors = _example_tensors(list(args))
        training = self.fn.training if isinstance(self.fn, Module) else None
        key = (tuple((t.shape, t.dtype) for t in tensors), training)
        if key not in self.cache:
            graph = trace(self.fn, tensors)
            module = compile_graph(graph, target=self.target, pipeline=self.pipeline)
            self.cache[key] = (module, [v.name for v in graph.inputs])
        module, names = self.cache[key]
        try:
            outs = module.run({n: t.numpy() for n, t in zip(names, tensors)})
        except KilnError as err:
            raise _error(str(err)) from None
        results = [Tensor(np.asarray(a)) for a in outs.values()]
        return results[0] if len(results) == 1 else tuple(results)


def jit(fn: Callable | None = None, *, target: str = "llvm", pipeline: str | None = None):
    """Decorator (or wrapper of a Module): trace on first call, then run the compiled module."""
    if fn is None:
        return lambda f: Jitted(f, target, pipeline)
    return Jitted(fn, target, pipeline)
