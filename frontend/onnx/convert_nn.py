"""Converters for convolution, pooling, normalization, matrix products, softmax, reductions,
recurrent layers and losses: ONNX's implicit forms (auto_pad, output_shape, opset-specific
inputs) are resolved into kiln's explicit attributes here."""

from __future__ import annotations

import math


from kiln.frontend.onnx.convert_elementwise import passthrough
from kiln.frontend.onnx.importer import NodeContext, converter, dtype_from_onnx

# -- padding -----------------------------------------------------------------------------------


def resolve_pads(ctx: NodeContext, spatial, kernel, strides, dilations, ceil_mode: bool = False) -> list[int]:
    """Explicit begin/end pads from ``auto_pad`` (SAME_UPPER/SAME_LOWER/VALID) or ``pads``."""
    nd = len(spatial)
    auto = ctx.attr("auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        return list(ctx.attr("pads", [0] * (2 * nd)))
    if auto == "VALID":
        return [0] * (2 * nd)
    if auto not in ("SAME_UPPER", "SAME_LOWER"):
        raise ctx.error(f"unknown auto_pad {auto!r}")
    begin, end = [], []
    for i in range(nd):
        out = math.ceil(spatial[i] / strides[i])
        eff = (kernel[i] - 1) * dilations[i] + 1
        total = max(0, (out - 1) * strides[i] + eff - spatial[i])
        small, big = total // 2, total - total // 2
        begin.append(small if auto == "SAME_UPPER" else big)
        end.append(big if auto == "SAME_UPPER" else small)
    return begin + end


def _window_attrs(ctx: NodeContext, kernel) -> dict:
    nd = len(kernel)
    spatial = ctx.type(0).shape[2:]
    strides = list(ctx.attr("strides", [1] * nd))
    dilations = list(ctx.attr("dilations", [1] * nd))
    pads = resolve_pads(ctx, spatial, kernel, strides, dilations)
    return {"strides": strides, "dilations": dilations, "pads": pads}


@converter("Conv")
def _conv(ctx: NodeContext):
    w = ctx.type(1)
    attrs = _window_attrs(ctx, w.shape[2:])
    attrs["group"] = ctx.attr("group", 1)
    return ctx.emit("Conv", ctx.inputs(), attrs)


@converter("ConvInteger", "QLinearConv")
def _integer_conv(ctx: NodeContext):
    w = ctx.type(1 if ctx.node.op_type == "ConvInteger" else 3)
    attrs = _window_attrs(ctx, w.shape[2:])
    attrs["group"] = ctx.attr("group", 1)
    return ctx.emit(ctx.node.op_type, ctx.inputs(), attrs)


@converter("ConvTranspose")
def _conv_transpose(ctx: NodeContext):
    x, w = ctx.type(0), ctx.type(1)
    nd = x.rank - 2
    kernel = w.shape[2:]
    strides = list(ctx.attr("strides", [1] * nd))
    dilations = list(ctx.attr("dilations", [1] * nd))
    opad = list(ctx.attr("output_padding", [0] * nd))
    out_shape = ctx.attr("output_shape")
    auto = ctx.attr("auto_pad", "NOTSET")
    pads = ctx.attr("pads")
    if pads is None and (out_shape is not None or auto in ("SAME_UPPER", "SAME_LOWER")):
        if out_shape is None:
            out_shape = [x.shape[2 + i] * strides[i] for i in range(nd)]
        out_shape = list(out_shape)[-nd:]
        begin, end = [], []
        for i in range(nd):
            total = strides[i] * (x.shape[2 + i] - 1) + opad[i] + (kernel[i] - 1) * dilations[i] + 1 - out_shape[i]
            if total < 0:
                # a larger output_shape than the stride gives: the extra goes into output_padding
                opad[i] -= total
                total = 0
            small, big = total // 2, total - total // 2
            begin.append(small if auto == "SAME_UPPER" else big)
            end.append(big if auto == "SAME_UPPER" else small)
        pads = begin + end
    attrs = {
        "strides": strides,
        "dilations": dilations,
        "pads": list(pads) if pads is not None else [0] * (2 * nd),
        "group": ctx.attr("group", 1),
        "output_padding": opad,
    }
    return ctx.emit("ConvTranspose", ctx.inputs(), attrs)


def _pool_attrs(ctx: NodeContext) -> dict:
    kernel = list(ctx.attr("kernel_shape"))
    attrs = _window_attrs(ctx, kernel)
    attrs["kernel_shape"] = kernel
    attrs["ceil_mode"] = ctx.attr("ceil_mode", 0)
    return attrs


@converter("MaxPool")
def _max_pool(ctx: NodeContext):
    attrs = _pool_attrs(ctx)
    attrs["storage_order"] = ctx.attr("storage_order", 0)
    return ctx.emit("MaxPool", [ctx.input(0)], attrs, num_outputs=len(ctx.node.output))


@converter("AveragePool")
def _avg_pool(ctx: NodeContext):
    attrs = _pool_attrs(ctx)
    attrs["count_include_pad"] = ctx.attr("count_include_pad", 0)
    return ctx.emit("AveragePool", [ctx.input(0)], attrs)


@converter("LpPool")
def _lp_pool(ctx: NodeContext):
    attrs = _pool_attrs(ctx)
    attrs["p"] = ctx.attr("p", 2)
    return ctx.emit("LpPool", [ctx.input(0)], attrs)


@converter("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "LRN", "LpNormalization", "MeanVarianceNormalization")
def _simple_nn(ctx: NodeContext):
    return passthrough(ctx)


@converter("MaxUnpool")
def _max_unpool(ctx: NodeContext):
    x = ctx.type(0)
    nd = x.rank - 2
    kernel = list(ctx.attr("kernel_shape"))
    strides = list(ctx.attr("strides", [1] * nd))
    pads = list(ctx.attr("pads", [0] * (2 * nd)))
    unpooled = [(x.shape[2 + i] - 1) * strides[i] + kernel[i] - pads[i] - pads[i + nd] for i in range(nd)]
    shape = ctx.const_ints(2, "output_shape") or [*x.shape[:2], *unpooled]
    return ctx.emit("MaxUnpool", [ctx.input(0), ctx.input(1)], {"output_shape": shape, "unpooled_shape": unpooled})


@converter("Col2Im")
def _col2im(ctx: NodeContext):
    attrs = {
        "image_shape": ctx.const_ints(1, "image_shape"),
        "block_shape": ctx.const_ints(2, "block_shape"),
        "strides": ctx.attr("strides"),
        "pads": ctx.attr("pads"),
        "dilations": ctx.attr("dilations"),
    }
    return ctx.emit("Col2Im", [ctx.input(0)], attrs)


# -- normalization -------------------------------------------------------------------------------


@converter("BatchNormalization")
def _batch_norm(ctx: NodeContext):
    training = ctx.attr("training_mode", 0) if ctx.opset >= 14 else 0
    if ctx.opset < 9 and not ctx.attr("spatial", 1):
        raise ctx.error("spatial=0 (per-activation statistics) is not supported")
    if not training and len([o for o in ctx.node.output if o]) > 1:
        raise ctx.error("training-statistics outputs of opset < 14 are not supported")
    attrs = {"epsilon": ctx.attr("epsilon", 1e-5), "momentum": ctx.attr("momentum", 0.9), "training_mode": training}
    return ctx.emit("BatchNormalization", ctx.inputs()[:5], attrs, num_outputs=len(ctx.node.output))


@converter("InstanceNormalization")
def _instance_norm(ctx: NodeContext):
    return passthrough(ctx)


@converter("RMSNormalization")
def _rms_norm(ctx: NodeContext):
    # stash_type picks the accumulation precision; kiln's reference accumulates in float64
    return ctx.emit("RMSNormalization", ctx.inputs(), {"axis": ctx.attr("axis", -1), "epsilon": ctx.attr("epsilon", 1e-5)})


@converter("GroupNormalization")
def _group_norm(ctx: NodeContext):
    x = ctx.type(0)
    groups = ctx.attr("num_groups")
    scale, bias = ctx.input(1), ctx.input(2)
    channels = x.shape[1]
    if scale.type.shape == (groups,) and groups != channels:
        # opset 18 gives one scale/bias per group: repeat them per channel
        per = channels // groups
        scale, bias = (
            ctx.reshape(ctx.emit("Expand", [ctx.reshape(v, [groups, 1])], {"shape": [groups, per]})[0], [channels])
            for v in (scale, bias)
        )
    attrs = {"num_groups": groups, "epsilon": ctx.attr("epsilon", 1e-5)}
    return ctx.emit("GroupNormalization", [ctx.input(0), scale, bias], attrs)


@converter("LayerNormalization")
def _layer_norm(ctx: NodeContext):
    attrs = {"axis": ctx.attr("axis", -1), "epsilon": ctx.attr("epsilon", 1e-5)}
    return ctx.emit("LayerNormalization", ctx.inputs(), attrs, num_outputs=len(ctx.node.output))


# -- matrix products --------------------------------------------------------------------------


@converter("Det")
def _det(ctx: NodeContext):
    return passthrough(ctx)


@converter("Gemm", "MatMul", "MatMulInteger", "QLinearMatMul")
def _gemm(ctx: NodeContext):
    # opset < 7 Gemm's `broadcast` flag: C broadcasts in every opset kiln's Gemm implements
    return passthrough(ctx, ignore=("broadcast",))


def explicit_einsum(equation: str) -> str:
    """Add ONNX's implicit output (indices seen once, sorted; ``...`` first) to ``equation``."""
    eq = equation.replace(" ", "")
    if "->" in eq:
        return eq
    letters = eq.replace("...", "").replace(",", "")
    once = sorted(c for c in set(letters) if letters.count(c) == 1)
    return eq + "->" + ("..." if "..." in eq else "") + "".join(once)


@converter("Einsum")
def _einsum(ctx: NodeContext):
    return ctx.emit("Einsum", ctx.inputs(), {"equation": explicit_einsum(ctx.attr("equation"))})


# -- softmax family and reductions -----------------------------------------------------------------


@converter("Softmax", "LogSoftmax", "Hardmax")
def _softmax(ctx: NodeContext):
    x = ctx.input(0)
    if ctx.opset >= 13:
        return ctx.emit(ctx.node.op_type, [x], {"axis": ctx.attr("axis", -1)})
    # before opset 13 the op coerces its input to 2-D at `axis`
    axis = ctx.attr("axis", 1) % max(x.type.rank, 1)
    rows = math.prod(x.type.shape[:axis])
    flat = ctx.reshape(x, [rows, x.type.numel // rows if rows else 0])
    y = ctx.emit(ctx.node.op_type, [flat], {"axis": 1})[0]
    return [ctx.reshape(y, x.type.shape)]


REDUCE_OPS = (
    "ReduceSum ReduceMean ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceSumSquare"
).split()


@converter(*REDUCE_OPS)
def _reduce(ctx: NodeContext):
    op = ctx.node.op_type
    axes_as_input = ctx.opset >= (13 if op == "ReduceSum" else 18)
    axes = ctx.const_ints(1, "axes") if axes_as_input else ctx.attr("axes")
    keepdims = ctx.attr("keepdims", 1)
    if not axes:
        if ctx.attr("noop_with_empty_axes", 0):
            return [ctx.input(0)]
        axes = None
    return ctx.emit(op, [ctx.input(0)], {"axes": list(axes) if axes is not None else None, "keepdims": keepdims})


@converter("ArgMax", "ArgMin")
def _arg(ctx: NodeContext):
    return passthrough(ctx)


@converter("CumSum", "CumProd")
def _cumulative(ctx: NodeContext):
    axis = ctx.const_ints(1, "axis")[0]
    attrs = {"axis": axis, "exclusive": ctx.attr("exclusive", 0), "reverse": ctx.attr("reverse", 0)}
    return ctx.emit(ctx.node.op_type, [ctx.input(0)], attrs)


@converter("TopK")
def _topk(ctx: NodeContext):
    k = ctx.attr("k") if ctx.opset < 10 else ctx.const_ints(1, "K")[0]
    attrs = {"k": k, "axis": ctx.attr("axis", -1), "largest": ctx.attr("largest", 1), "sorted": ctx.attr("sorted", 1)}
    return ctx.emit("TopK", [ctx.input(0)], attrs, num_outputs=len(ctx.node.output))


# -- recurrent layers and losses -------------------------------------------------------------------


@converter("RNN", "GRU", "LSTM")
def _rnn(ctx: NodeContext):
    return passthrough(ctx)


@converter("SoftmaxCrossEntropyLoss", "NegativeLogLikelihoodLoss")
def _loss(ctx: NodeContext):
    return passthrough(ctx)




@converter("Attention")
def _attention(ctx: NodeContext):
    attrs = ctx.attrs()
    precision = attrs.pop("softmax_precision", None)
    if precision is not None:
        attrs["softmax_precision"] = dtype_from_onnx(precision, f"node {ctx.name!r} (Attention) softmax_precision").short
    return ctx.emit("Attention", ctx.inputs(), attrs, num_outputs=len(ctx.node.output))


@converter("DynamicQuantizeLinear")
def _dynamic_quantize(ctx: NodeContext):
    """kiln's op (onnxruntime's rule: scale 1 for an empty range, where ONNX's function body
    divides by 0), so llvm runs it as one kernel."""
    return passthrough(ctx)


@converter("QuantizeLinear", "DequantizeLinear")
def _quantize(ctx: NodeContext):
    attrs = {"axis": ctx.attr("axis", 1), "block_size": ctx.attr("block_size", 0)}
    if ctx.attr("output_dtype"):
        attrs["output_dtype"] = dtype_from_onnx(ctx.attr("output_dtype"), f"node {ctx.name!r} output_dtype").short
    if ctx.attr("precision"):
        raise ctx.error("the precision attribute is not supported")
    if ctx.node.op_type == "QuantizeLinear" and not ctx.attr("saturate", 1):
        raise ctx.error("saturate=0 applies to float8 outputs, which kiln does not have")
    return ctx.emit(ctx.node.op_type, ctx.inputs(), attrs)
