"""Gradient rules of index-driven ops (each the adjoint of its gather or scatter), running
sums and Einsum.

A scatter without reduction gives its updates the cotangent at the positions they land on;
where two updates name one position, the reference keeps the last, and both get it here:
those rules hold for distinct indices, as in every use of them as a layer.
"""

from __future__ import annotations

import string

from kiln.errors import KilnError
from kiln.ir.ops.linalg import einsum_labels
from kiln.passes.autodiff.rules_elementwise import vjp


def _axis(node) -> int:
    return node.attrs["axis"] % node.inputs[0].type.rank


@vjp("TopK")
def _top_k(b, node, grads):
    """Each value's cotangent goes back to the element it came from (indices are distinct)."""
    x = node.inputs[0]
    if grads[0] is None:
        return [None]
    if len(node.outputs) < 2:
        raise KilnError("autodiff: a TopK without its indices output has no gradient rule")
    return [b.op("ScatterElements", b.zeros_like(x), node.outputs[1], grads[0], axis=_axis(node), reduction="add")]


@vjp("CumSum")
def _cumsum(b, node, grads):
    """x_i reaches every y_j the running sum carries it to: the sum of g the other way."""
    a = node.attrs
    return [b.op("CumSum", grads[0], axis=a["axis"], exclusive=a["exclusive"], reverse=int(not a["reverse"]))]


@vjp("GatherElements")
def _gather_elements(b, node, grads):
    data, idx = node.inputs
    return [b.op("ScatterElements", b.zeros_like(data), idx, grads[0], axis=_axis(node), reduction="add"), None]


@vjp("ScatterElements")
def _scatter_elements(b, node, grads):
    data, idx, upd = node.inputs
    g, axis, reduction = grads[0], _axis(node), node.attrs["reduction"]
    if reduction not in ("none", "add"):
        raise KilnError(f"autodiff: ScatterElements with reduction {reduction!r} has no gradient rule")
    d_data = None
    if b.wants(0):  # what no update overwrote
        d_data = g if reduction == "add" else b.op("ScatterElements", g, idx, b.zeros_like(upd), axis=axis)
    d_upd = b.op("GatherElements", g, idx, axis=axis) if b.wants(2) else None
    return [d_data, None, d_upd]


@vjp("GatherND")
def _gather_nd(b, node, grads):
    data, idx = node.inputs
    if node.attrs["batch_dims"]:
        raise KilnError("autodiff: GatherND with batch_dims has no gradient rule")
    return [b.op("ScatterND", b.zeros_like(data), idx, grads[0], reduction="add"), None]


@vjp("ScatterND")
def _scatter_nd(b, node, grads):
    data, idx, upd = node.inputs
    g, reduction = grads[0], node.attrs["reduction"]
    if reduction not in ("none", "add"):
        raise KilnError(f"autodiff: ScatterND with reduction {reduction!r} has no gradient rule")
    d_data = None
    if b.wants(0):
        d_data = g if reduction == "add" else b.op("ScatterND", g, idx, b.zeros_like(upd))
    d_upd = b.op("GatherND", g, idx) if b.wants(2) else None
    return [d_data, None, d_upd]


@vjp("ReverseSequence")
def _reverse_sequence(b, node, grads):
    """Reversing each row's prefix is its own inverse."""
    return [b.op("ReverseSequence", grads[0], node.inputs[1], **node.attrs), None]


@vjp("Einsum")
def _einsum(b, node, grads):
    """Operand i's gradient is the einsum of the cotangent with the other operands into i's
    labels; a label only i has is summed in the forward and broadcast back here, and a dim i
    broadcast (size 1) is summed back. A label repeated within one term (a diagonal) has no
    rule yet."""
    operands = node.inputs
    labels, out_labels = einsum_labels(node.attrs["equation"], [v.type.rank for v in operands])
    if any(len(set(dims)) != len(dims) for dims in labels):
        raise KilnError(f"autodiff: Einsum {node.attrs['equation']!r} repeats a label within a term; no gradient rule")
    sizes: dict[str, int] = {}
    for dims, v in zip(labels, operands):
        for label, d in zip(dims, v.type.shape):
            sizes[label] = max(sizes.get(label, 1), d)
    letters = dict(zip(sizes, string.ascii_letters))  # ellipsis labels are digits: letters for all
    spell = lambda dims: "".join(letters[d] for d in dims)  # noqa: E731
    out = []
    for i, (dims, x) in enumerate(zip(labels, operands)):
        if not b.wants(i):
            out.append(None)
            continue
        others = [(d, v) for k, (d, v) in enumerate(zip(labels, operands)) if k != i]
        # labels the others carry at full size (a broadcast size-1 dim reaches nothing)
        reachable = set(out_labels).union(*[{d for d, n in zip(dims_k, v.type.shape) if n == sizes[d]} for dims_k, v in others])
        kept = [d for d in dims if d in reachable]
        equation = ",".join([spell(out_labels), *[spell(d) for d, _ in others]]) + "->" + spell(kept)
        grad = b.op("Einsum", grads[0], *[v for _, v in others], equation=equation)
        full = [sizes[d] for d in dims]
        if len(kept) < len(dims):  # labels only this operand has: the sum's cotangent spreads
            grad = b.op("Expand", b.reshape(grad, [sizes[d] if d in reachable else 1 for d in dims]), shape=full)
        out.append(b.unbroadcast(grad, x.type.shape))
    return out
