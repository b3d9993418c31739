"""Gradient rules of the elementwise ops and activations (broadcasting undone by summing)."""

from __future__ import annotations

from typing import Callable

from kiln.ir.opdef import get_op


def vjp(*names: str) -> Callable:
    """Install the decorated function as the gradient rule of ``names``."""

    def wrap(rule: Callable) -> Callable:
        for name in names:
            op = get_op(name)
            if op.vjp is not None:
                raise ValueError(f"two gradient rules for {name}")
            op.vjp = rule
        return rule

    return wrap


def _each(b, node, grads):
    """(cotangent, inputs, output) of a one-output node."""
    return grads[0], node.inputs, node.outputs[0]


@vjp("Identity", "Dropout")
def _identity(b, node, grads):
    if node.op.name == "Dropout" and node.attrs["training_mode"] and node.attrs["ratio"]:
        from kiln.passes.decompose import dropout_scale

        return [b.op("Mul", grads[0], dropout_scale(b, node.attrs, node.inputs[0]))]
    return [grads[0]]


@vjp("Add", "Sub")
def _add(b, node, grads):
    g, (x, y), _ = _each(b, node, grads)
    gy = g if node.op.name == "Add" else b.op("Neg", g)
    return [b.unbroadcast(g, x.type.shape) if b.wants(0) else None, b.unbroadcast(gy, y.type.shape) if b.wants(1) else None]


@vjp("Mul")
def _mul(b, node, grads):
    g, (x, y), _ = _each(b, node, grads)
    return [
        b.unbroadcast(b.op("Mul", g, y), x.type.shape) if b.wants(0) else None,
        b.unbroadcast(b.op("Mul", g, x), y.type.shape) if b.wants(1) else None,
    ]


@vjp("Div")
def _div(b, node, grads):
    g, (x, y), out = _each(b, node, grads)
    gx = b.op("Div", g, y)
    return [
        b.unbroadcast(gx, x.type.shape) if b.wants(0) else None,
        b.unbroadcast(b.op("Neg", b.op("Mul", gx, out)), y.type.shape) if b.wants(1) else None,
    ]


@vjp("Neg")
def _neg(b, node, grads):
    return [b.op("Neg", grads[0])]


@vjp("Sum")
def _sum(b, node, grads):
    return [b.unbroadcast(grads[0], x.type.shape) if b.wants(i) else None for i, x in enumerate(node.inputs)]


def _where(b, cond, g):
    return b.op("Where", cond, g, b.const(0.0, g))


@vjp("Relu")
def _relu(b, node, grads):
    x = node.inputs[0]
    return [_where(b, b.op("Greater", x, b.const(0.0, x)), grads[0])]


@vjp("LeakyRelu")
def _leaky_relu(b, node, grads):
    x, g = node.inputs[0], grads[0]
    return [b.op("Where", b.op("GreaterOrEqual", x, b.const(0.0, x)), g, b.scale(g, node.attrs["alpha"]))]


@vjp("Sigmoid")
def _sigmoid(b, node, grads):
    y = node.outputs[0]
    return [b.op("Mul", grads[0], b.op("Mul", y, b.op("Sub", b.const(1.0, y), y)))]


@vjp("Tanh")
def _tanh(b, node, grads):
    y = node.outputs[0]
    return [b.op("Mul", grads[0], b.op("Sub", b.const(1.0, y), b.op("Mul", y, y)))]


@vjp("Exp")
def _exp(b, node, grads):
    return [b.op("Mul", grads[0], node.outputs[0])]


@vjp("Log")
def _log(b, node, grads):
    return [b.op("Div", grads[0], node.inputs[0])]


@vjp("Sqrt")
def _sqrt(b, node, grads):
    y = node.outputs[0]
    return [b.op("Div", grads[0], b.op("Mul", y, b.const(2.0, y)))]


@vjp("Reciprocal")
def _reciprocal(b, node, grads):
    y = node.outputs[0]
    return [b.op("Neg", b.op("Mul", grads[0], b.op("Mul", y, y)))]


@vjp("Abs")
def _abs(b, node, grads):
    return [b.op("Mul", grads[0], b.op("Sign", node.inputs[0]))]


@vjp("Softplus")
def _softplus(b, node, grads):
    return [b.op("Mul", grads[0], b.op("Sigmoid", node.inputs[0]))]


@vjp("Pow")
def _pow(b, node, grads):
    g, (x, y), out = _each(b, node, grads)
    gx = gy = None
    if b.wants(0):  # y * x^(y-1)
        gx = b.unbroadcast(b.op("Mul", g, b.op("Mul", y, b.op("Pow", x, b.op("Sub", y, b.const(1.0, y))))), x.type.shape)
    if b.wants(1):  # x^y * log(x)
        gy = b.unbroadcast(b.op("Mul", g, b.op("Mul", out, b.op("Log", x))), y.type.shape)
    return [gx, gy]


@vjp("Max", "Min")
def _max_min(b, node, grads):
    if len(node.inputs) != 2:
        from kiln.errors import KilnError

        raise KilnError(f"autodiff: {node.op.name} of {len(node.inputs)} operands: only two have a gradient rule yet")
    g, (x, y), out = _each(b, node, grads)
    picks_x = b.op("Equal", out, x)  # ties go to the first operand
    return [
        b.unbroadcast(_where(b, picks_x, g), x.type.shape) if b.wants(0) else None,
        b.unbroadcast(_where(b, b.op("Not", picks_x), g), y.type.shape) if b.wants(1) else None,
    ]


@vjp("Clip")
def _clip(b, node, grads):
    x, lo, hi = (list(node.inputs) + [None, None])[:3]
    inside = None
    for bound, cmp in ((lo, "GreaterOrEqual"), (hi, "LessOrEqual")):
        if bound is not None:
            test = b.op(cmp, x, bound)
            inside = test if inside is None else b.op("And", inside, test)
    return [grads[0] if inside is None else _where(b, inside, grads[0])]


@vjp("Where")
def _select(b, node, grads):
    g, (cond, x, y), _ = _each(b, node, grads)
    return [
        None,
        b.unbroadcast(_where(b, cond, g), x.type.shape) if b.wants(1) else None,
        b.unbroadcast(_where(b, b.op("Not", cond), g), y.type.shape) if b.wants(2) else None,
    ]


@vjp("Cast")
def _cast(b, node, grads):
    x = node.inputs[0]
    if not x.type.dtype.name.startswith("float"):
        return [None]
    return [b.op("Cast", grads[0], to=x.type.dtype.short)]
