"""Reverse-mode autodiff as a graph transform.

``add_gradients(graph, loss, wrt)`` appends to ``graph`` the nodes that compute d loss / d w
for every ``w`` in ``wrt`` and returns them: gradients are graph nodes, built by each op's
``vjp`` rule (``OpDef.vjp``, filled by the ``rules_*`` modules), never Python closures.
The forward values the rules read are the forward graph's own (saved activations are shared,
nothing is recomputed unless a rule chooses to). Where a value fans out its gradients are
summed; only nodes on a path from ``wrt`` to the loss get a gradient (the rest are pruned).
A node on that path whose op has no rule but a decomposition (``passes/decompose.py``) is
replaced by it first, in the forward graph.

A rule is ``vjp(b: GradBuilder, node, grads) -> [gradient per input]``: ``grads`` holds one
cotangent per node output (None where nothing flows back), and the rule returns one value per
input (None where the input needs none: ``b.wants(i)`` says which do).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from kiln.errors import KilnError
from kiln.ir.graph import Graph, Value
from kiln.ir.opdef import all_ops


class GradBuilder:
    """Adds nodes to the graph, named after ``where`` (a VJP rule's: ``grad/<node>``);
    ``wanted[i]`` says whether the node's input ``i`` needs a gradient."""

    def __init__(self, graph: Graph, where: str, wanted: Sequence[bool] = ()):
        self.graph, self.where, self.wanted = graph, where, list(wanted)

    def wants(self, i: int) -> bool:
        return i < len(self.wanted) and self.wanted[i]

    def ops(self, op: str, inputs: Sequence[Value | None], **attrs: Any) -> list[Value]:
        return self.graph.add_node(op, list(inputs), attrs, name=f"{self.where}/{op}").outputs

    def op(self, op: str, *inputs: Value | None, **attrs: Any) -> Value:
        return self.ops(op, inputs, **attrs)[0]

    def const(self, value: float, like: Value, shape: Sequence[int] = ()) -> Value:
        """A constant of ``like``'s dtype (a parameter, folded where the passes can)."""
        array = np.full(tuple(shape), value, dtype=like.type.dtype.numpy)
        return self.graph.add_param(self.graph.fresh_name(f"{self.where}.const"), array)

    def reshape(self, v: Value, shape: Sequence[int]) -> Value:
        return v if tuple(v.type.shape) == tuple(shape) else self.op("Reshape", v, shape=list(shape))

    def flip(self, v: Value, axes: Sequence[int]) -> Value:
        """``v`` reversed along ``axes`` (a Slice with step -1)."""
        n = len(axes)
        return self.op("Slice", v, starts=[-1] * n, ends=[-v.type.shape[a] - 1 for a in axes], axes=list(axes), steps=[-1] * n)

    def unbroadcast(self, grad: Value, shape: Sequence[int]) -> Value:
        """``grad`` (of a broadcast result) summed back to an operand of ``shape``."""
        shape = tuple(shape)
        if tuple(grad.type.shape) == shape:
            return grad
        rank = len(grad.type.shape)
        padded = (1,) * (rank - len(shape)) + shape
        axes = [i for i, (n, m) in enumerate(zip(grad.type.shape, padded)) if m == 1 and n != 1 or i < rank - len(shape)]
        if axes:
            grad = self.op("ReduceSum", grad, axes=axes, keepdims=1)
        return self.reshape(grad, shape)

    def scale(self, v: Value, factor: float) -> Value:
        return v if factor == 1.0 else self.op("Mul", v, self.const(factor, v))

    def zeros_like(self, v: Value) -> Value:
        return zeros_like(self.graph, v, self.where)

    def zeros(self, shape: Sequence[int], like: Value) -> Value:
        """Zeros of ``shape`` in ``like``'s dtype."""
        attrs = {"shape": list(shape), "value": 0.0, "dtype": like.type.dtype.short}
        return self.graph.add_node("ConstantOfShape", [], attrs, name=f"{self.where}/zeros").outputs[0]

    def moments(self, x: Value, axes: Sequence[int], eps: float) -> tuple[Value, Value, Value, Value]:
        """Over ``axes`` of ``x`` (kept as size-1 dims): the mean, ``x`` centered, the
        (population) variance and 1 / sqrt(variance + eps): what every normalization computes."""
        mean = self.op("ReduceMean", x, axes=list(axes), keepdims=1)
        centered = self.op("Sub", x, mean)
        var = self.op("ReduceMean", self.op("Mul", centered, centered), axes=list(axes), keepdims=1)
        inv_std = self.op("Reciprocal", self.op("Sqrt", self.op("Add", var, self.const(eps, x))))
        return mean, centered, var, inv_std

    def normalized_grad(self, g_hat: Value, x_hat: Value, inv_std: Value, axes: Sequence[int]) -> Value:
        """The gradient through ``x_hat = (x - mean) * inv_std`` with the statistics taken over
        ``axes``, given the gradient ``g_hat`` of ``x_hat``:
        (g_hat - mean(g_hat) - x_hat * mean(g_hat * x_hat)) * inv_std."""
        m1 = self.op("ReduceMean", g_hat, axes=list(axes), keepdims=1)
        m2 = self.op("ReduceMean", self.op("Mul", g_hat, x_hat), axes=list(axes), keepdims=1)
        return self.op("Mul", self.op("Sub", self.op("Sub", g_hat, m1), self.op("Mul", x_hat, m2)), inv_std)


def zeros_like(graph: Graph, v: Value, where: str = "grad") -> Value:
    attrs = {"shape": list(v.type.shape), "value": 0.0, "dtype": v.type.dtype.short}
    return graph.add_node("ConstantOfShape", [], attrs, name=f"{where}/zeros").outputs[0]


def add_gradients(graph: Graph, loss: Value, wrt: Sequence[Value]) -> list[Value]:
    """Append the gradient of the scalar ``loss`` with respect to each of ``wrt`` to ``graph``
    and return those values (zeros for a ``w`` the loss does not depend on)."""
    _load_rules()
    if loss.type.numel != 1 or not loss.type.dtype.name.startswith("float"):
        raise KilnError(f"autodiff: the loss {loss.name!r} must be a floating-point scalar, got {loss.type}")
    _decompose_underivable(graph, _depends_on(graph, wrt))
    depends = _depends_on(graph, wrt)
    forward = list(graph.nodes)
    grads: dict[Value, Value] = {loss: graph.add_node("ConstantOfShape", [], {"shape": list(loss.type.shape), "value": 1.0, "dtype": loss.type.dtype.short}, name="grad/seed").outputs[0]}
    for node in reversed(forward):
        outs = [grads.get(v) for v in node.outputs]
        wanted = [v is not None and v in depends for v in node.inputs]
        if all(g is None for g in outs) or not any(wanted):
            continue
        if node.op.vjp is None:
            raise KilnError(f"autodiff: node {node.name or node.op.name!r} ({node.op.name}) has no gradient rule yet")
        builder = GradBuilder(graph, f"grad/{node.name or node.op.name}", wanted)
        in_grads = node.op.vjp(builder, node, outs)
        for value, want, grad in zip(node.inputs, wanted, in_grads):
            if not want or grad is None:
                continue
            if tuple(grad.type.shape) != tuple(value.type.shape):
                raise KilnError(f"internal error: the gradient rule of {node.op.name} gave {grad.type} for {value.name!r} {value.type}")
            grads[value] = grad if value not in grads else builder.op("Add", grads[value], grad)
    return [grads[w] if w in grads else zeros_like(graph, w) for w in wrt]


def _decompose_underivable(graph: Graph, depends: set[Value]) -> None:
    """Replace the nodes on a path from ``wrt`` whose op has no gradient rule but a
    decomposition (Attention, LpPool, ReduceLogSumExp, ...) by that decomposition, in place:
    its ops' rules then give the gradient."""
    from kiln.passes.decompose import RULES, decompose_node, load_rules

    load_rules()
    for node in [n for n in graph.nodes if n.op.vjp is None and n.op.name in RULES]:
        if any(v is not None and v in depends for v in node.inputs):
            decompose_node(graph, node)


def _depends_on(graph: Graph, wrt: Sequence[Value]) -> set[Value]:
    """Values computed from any of ``wrt`` (the only ones that need a gradient)."""
    depends = set(wrt)
    for node in graph.nodes:
        if any(v is not None and v in depends for v in node.inputs):
            depends.update(node.outputs)
    return depends


def has_vjp(op_name: str) -> bool:
    _load_rules()
    return all_ops()[op_name].vjp is not None


def _load_rules() -> None:
    from kiln.passes.autodiff import rules_derived, rules_elementwise, rules_index, rules_nn, rules_tensor  # noqa: F401

    rules_derived.install()  # after the hand-written rules, which it leaves alone
