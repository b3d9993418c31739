"""Converters for elementwise ONNX ops (mostly one-to-one), Cast, Clip, Dropout, Constant."""

from __future__ import annotations

import numpy as np

from kiln.frontend.onnx.importer import NodeContext, converter, dtype_from_onnx
from kiln.ir.dtypes import DType
from kiln.ir.opdef import get_op


# attributes of opsets < 7 that change nothing for inference
LEGACY_IGNORED = frozenset({"consumed_inputs", "is_test"})


def passthrough(ctx: NodeContext, op: str | None = None, ignore: tuple[str, ...] = ()) -> list:
    """The ONNX node as the kiln op of the same name; attributes copied, unknown ones refused."""
    opdef = get_op(op or ctx.node.op_type)
    attrs = {}
    for key, value in ctx.attrs().items():
        if key in LEGACY_IGNORED or key in ignore:
            continue
        if key not in opdef.attrs:
            raise ctx.error(f"attribute {key!r} is not supported")
        attrs[key] = value
    return ctx.emit(opdef, ctx.inputs(), attrs, num_outputs=len(ctx.node.output))


ONE_TO_ONE = """
Abs Neg Sign Exp Log Sqrt Reciprocal Floor Ceil Round Sin Cos Tan Asin Acos Atan Sinh Cosh Tanh
Asinh Acosh Atanh Erf Sigmoid Relu Softplus Softsign Mish HardSwish HardSigmoid LeakyRelu Elu Celu
Selu ThresholdedRelu Shrink Gelu Not BitwiseNot IsNaN IsInf Add Sub Mul Div Mod BitShift PRelu Pow
Equal Less LessOrEqual Greater GreaterOrEqual And Or Xor BitwiseAnd BitwiseOr BitwiseXor Sum Mean
Max Min Where
""".split()


@converter(*ONE_TO_ONE)
def _one_to_one(ctx: NodeContext):
    if ctx.opset < 7 and ctx.attr("broadcast") is not None:
        return _legacy_broadcast(ctx)
    if ctx.opset < 7 and ctx.node.op_type == "PRelu":
        # opset < 7 PRelu: a 1-D slope runs along the channel axis
        x, slope = ctx.input(0), ctx.input(1)
        if slope.type.rank == 1 and x.type.rank > 2 and slope.type.shape[0] == x.type.shape[1]:
            return ctx.emit("PRelu", [x, ctx.reshape(slope, [slope.type.shape[0]] + [1] * (x.type.rank - 2))])
    return passthrough(ctx)


def _legacy_broadcast(ctx: NodeContext) -> list:
    """Opset < 7 binaries: ``broadcast=1`` aligns B with A starting at ``axis`` (default: the end)."""
    a, b = ctx.input(0), ctx.input(1)
    if ctx.attr("broadcast") and ctx.attr("axis") is not None:
        axis = ctx.attr("axis") % a.type.rank
        trailing = a.type.rank - axis - b.type.rank
        b = ctx.reshape(b, [1] * axis + list(b.type.shape) + [1] * trailing)
    elif not ctx.attr("broadcast") and a.type.shape != b.type.shape:
        raise ctx.error(f"broadcast=0 but the shapes differ: {a.type} and {b.type}")
    return ctx.emit(ctx.node.op_type, [a, b])


@converter("Identity")
def _identity(ctx: NodeContext):
    return [ctx.input(0)]


@converter("Swish")
def _swish(ctx: NodeContext):
    x = ctx.input(0)
    alpha = ctx.attr("alpha", 1.0)
    scaled = ctx.emit("Mul", [x, ctx.constant(alpha, x.type.dtype.numpy)])[0] if alpha != 1.0 else x
    return ctx.emit("Mul", [x, ctx.emit("Sigmoid", [scaled])[0]])


@converter("Cast")
def _cast(ctx: NodeContext):
    to = dtype_from_onnx(ctx.attr("to"), f"node {ctx.name!r} (Cast)")
    x = ctx.input(0)
    if x.type.dtype == to:
        return [x]
    return ctx.emit("Cast", [x], {"to": to.short})


@converter("CastLike")
def _cast_like(ctx: NodeContext):
    x, like = ctx.input(0), ctx.input(1)
    if x.type.dtype == like.type.dtype:
        return [x]
    return ctx.emit("Cast", [x], {"to": like.type.dtype.short})


@converter("Clip")
def _clip(ctx: NodeContext):
    x = ctx.input(0)
    if ctx.opset < 11:
        dtype = x.type.dtype.numpy
        lo = ctx.attr("min", float(np.finfo(dtype).min))
        hi = ctx.attr("max", float(np.finfo(dtype).max))
        return ctx.emit("Clip", [x, ctx.constant(lo, dtype), ctx.constant(hi, dtype)])
    return ctx.emit("Clip", ctx.inputs())


@converter("Dropout")
def _dropout(ctx: NodeContext):
    x = ctx.input(0)
    if ctx.opset < 12:
        ratio, training = ctx.attr("ratio", 0.5), False  # opsets 7-11 define inference only
    else:
        r = ctx.const(1, "ratio")
        t = ctx.const(2, "training_mode")
        ratio = float(r.reshape(())) if r is not None else 0.5
        training = bool(t.reshape(())) if t is not None else False
    wants_mask = len(ctx.node.output) > 1 and ctx.node.output[1] != ""
    if not training:
        outs = [x]
        if wants_mask:
            outs.append(ctx.emit("ConstantOfShape", [], {"shape": list(x.type.shape), "value": True, "dtype": "bool"})[0])
        return outs
    seed = ctx.attr("seed", 0)
    return ctx.emit(
        "Dropout", [x], {"ratio": ratio, "training_mode": 1, "seed": seed}, num_outputs=2 if wants_mask else 1
    )


@converter("Constant")
def _constant(ctx: NodeContext):
    attrs = ctx.attrs()
    if "sparse_value" in attrs:
        raise ctx.error("sparse constants are not supported")
    if "value" in attrs:
        return [ctx.constant(attrs["value"])]
    kinds = {
        "value_float": np.float32,
        "value_floats": np.float32,
        "value_int": np.int64,
        "value_ints": np.int64,
    }
    for key, dtype in kinds.items():
        if key in attrs:
            return [ctx.constant(np.asarray(attrs[key], dtype=dtype))]
    raise ctx.error(f"Constant with {sorted(attrs)} (strings?) is not supported")


@converter("ConstantOfShape")
def _constant_of_shape(ctx: NodeContext):
    shape = ctx.const_ints(0, "shape") or []
    value = ctx.attr("value")
    array = np.zeros(1, np.float32) if value is None else np.asarray(value).reshape(-1)
    dtype = DType.from_numpy(array.dtype)
    return ctx.emit("ConstantOfShape", [], {"shape": shape, "value": array[0].item(), "dtype": dtype.short})




@converter("SwiGLU")
def _swiglu(ctx: NodeContext):
    a, b = ctx.input(0), ctx.input(1)
    if a.type.shape != b.type.shape:
        raise ctx.error(f"A {a.type} and B {b.type} must have the same shape")
    alpha = ctx.attr("alpha", 1.0)
    scaled = ctx.emit("Mul", [a, ctx.constant(alpha, a.type.dtype.numpy)])[0] if alpha != 1.0 else a
    swish = ctx.emit("Mul", [a, ctx.emit("Sigmoid", [scaled])[0]])[0]
    return ctx.emit("Mul", [swish, b])


@converter("BitCast")
def _bitcast(ctx: NodeContext):
    to = dtype_from_onnx(ctx.attr("to"), f"node {ctx.name!r} (BitCast)")
    return ctx.emit("BitCast", [ctx.input(0)], {"to": to.short})


@converter("EyeLike")
def _eye_like(ctx: NodeContext):
    x = ctx.type(0)
    dtype = dtype_from_onnx(ctx.attr("dtype"), f"node {ctx.name!r} (EyeLike)") if ctx.attr("dtype") is not None else x.dtype
    return [ctx.constant(np.eye(*x.shape, k=ctx.attr("k", 0), dtype=dtype.numpy))]
