"""Fused: one node holding a subgraph (its ``body``), made by the fusion pass. Backends compile
a group as one kernel; its reference semantics are the body's, evaluated node by node.

``kind`` says what the group is: ``elementwise`` (a chain of elementwise ops), ``epilogue``
(a heavy op such as Conv or Gemm with the elementwise ops after it), ``reduction`` (a
reduction with its elementwise producers and consumers), or ``normalize`` (a training-mode
BatchNormalization with the activation after it; its running statistics are extra outputs).
"""

from __future__ import annotations

from kiln.ir.graph import Graph
from kiln.ir.opdef import REQUIRED, OpDef, OpKind, register
from kiln.ir.ops.rules import fail

KINDS = ("elementwise", "epilogue", "reduction", "normalize")


def _infer(attrs, types):
    body = attrs["body"]
    if not isinstance(body, Graph):
        raise fail("body must be a graph")
    if attrs["kind"] not in KINDS:
        raise fail(f"kind {attrs['kind']!r} is not one of {KINDS}")
    expected = [v.type for v in body.inputs]
    if list(types) != expected:
        raise fail(f"inputs ({', '.join(map(str, types))}) do not match the body's ({', '.join(map(str, expected))})")
    from kiln.ir.verify import verify

    verify(body)
    return [v.type for v in body.outputs]


def _eager(attrs, *inputs):
    from kiln.ir.evaluate import evaluate

    return tuple(evaluate(attrs["body"], inputs))


register(
    OpDef(
        "Fused",
        OpKind.OPAQUE,
        _infer,
        _eager,
        {"kind": REQUIRED, "body": REQUIRED},
        num_inputs=(0, None),
        num_outputs=(1, None),
    )
)
