"""``kiln.nn.functional``: every IR op as a Python function, plus PyTorch-style conveniences.

Each registered op ``Foo`` is reachable as ``foo(*inputs, **attrs)`` (``ReduceMean`` as
``reduce_mean``, ``LSTM`` as ``lstm``), or by name with ``op("Foo", *inputs, **attrs)``.
The functions written out below (``conv2d``, ``linear``, ``interpolate``...) take PyTorch's
argument conventions and lower to the same ops; where a name exists in both, the written-out
function wins and the raw op stays reachable through ``op``.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np

from kiln.frontend.dsl.tensor import Tensor, _error, apply
from kiln.ir.dtypes import DType
from kiln.ir.opdef import all_ops


def op(name: str, *inputs: Any, num_outputs: int | None = None, **attrs: Any) -> Any:
    """The IR op ``name`` applied to ``inputs`` with ``attrs``: one Tensor, or a tuple."""
    return apply(name, inputs, attrs, num_outputs)


def _pair(v: int | Sequence[int], what: str) -> list[int]:
    if isinstance(v, int):
        return [v, v]
    v = list(v)
    if len(v) != 2:
        raise _error(f"{what} needs one int or two, got {v}")
    return v


# -- activations -------------------------------------------------------------------------------
def relu(x): return apply("Relu", [x])
def sigmoid(x): return apply("Sigmoid", [x])
def tanh(x): return apply("Tanh", [x])
def leaky_relu(x, negative_slope: float = 0.01): return apply("LeakyRelu", [x], {"alpha": negative_slope})
def elu(x, alpha: float = 1.0): return apply("Elu", [x], {"alpha": alpha})
def gelu(x, approximate: str = "none"): return apply("Gelu", [x], {"approximate": approximate})
def softplus(x): return apply("Softplus", [x])
def hardswish(x): return apply("HardSwish", [x])
def silu(x): return x * sigmoid(x)
def softmax(x, axis: int = -1): return apply("Softmax", [x], {"axis": axis})
def log_softmax(x, axis: int = -1): return apply("LogSoftmax", [x], {"axis": axis})
def clip(x, min=None, max=None):  # noqa: A002  (numpy's and PyTorch's names)
    return apply("Clip", [x, min, max])
def relu6(x): return clip(x, 0.0, 6.0)


# -- linear algebra ------------------------------------------------------------------------------
def matmul(a, b): return apply("MatMul", [a, b])


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias`` with ``weight`` of shape (out, in); Gemm for 2-D ``x``."""
    if x.ndim == 2:
        return apply("Gemm", [x, weight, bias], {"transB": 1})
    y = apply("MatMul", [x, apply("Transpose", [weight], {"perm": [1, 0]})])
    return y if bias is None else y + bias


# -- convolution and pooling ------------------------------------------------------------------------
def _conv_pads(padding, kernel: Sequence[int], dilation: Sequence[int], stride: Sequence[int]) -> list[int]:
    if padding == "same":
        if any(s != 1 for s in stride):
            raise _error("padding='same' needs stride 1")
        total = [(k - 1) * d for k, d in zip(kernel, dilation)]
        return [t // 2 for t in total] + [t - t // 2 for t in total]
    if padding == "valid":
        return [0, 0, 0, 0]
    p = _pair(padding, "padding")
    return p + p


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups: int = 1) -> Tensor:
    """2-D convolution of NCHW ``x`` with OIHW ``weight`` (PyTorch's argument conventions)."""
    stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
    pads = _conv_pads(padding, weight.shape[2:], dilation, stride)
    attrs = {"strides": stride, "pads": pads, "dilations": dilation, "group": groups}
    return apply("Conv", [x, weight, bias], attrs)


def conv_transpose2d(x, weight, bias=None, stride=1, padding=0, output_padding=0, groups: int = 1, dilation=1) -> Tensor:
    """Transposed 2-D convolution; ``weight`` is (in, out/groups, kH, kW) as in PyTorch and ONNX."""
    p = _pair(padding, "padding")
    attrs = {
        "strides": _pair(stride, "stride"),
        "pads": p + p,
        "dilations": _pair(dilation, "dilation"),
        "group": groups,
        "output_padding": _pair(output_padding, "output_padding"),
    }
    return apply("ConvTranspose", [x, weight, bias], attrs)


def _pool_attrs(kernel_size, stride, padding, ceil_mode: bool) -> dict[str, Any]:
    """The window attributes both pools share (stride defaults to the kernel size)."""
    p = _pair(padding, "padding")
    return {
        "kernel_shape": _pair(kernel_size, "kernel_size"),
        "strides": _pair(stride if stride is not None else kernel_size, "stride"),
        "pads": p + p,
        "ceil_mode": int(ceil_mode),
    }


def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False) -> Tensor:
    attrs = {**_pool_attrs(kernel_size, stride, padding, ceil_mode), "dilations": _pair(dilation, "dilation")}
    return apply("MaxPool", [x], attrs, num_outputs=1)


def avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode: bool = False, count_include_pad: bool = True) -> Tensor:
    attrs = {**_pool_attrs(kernel_size, stride, padding, ceil_mode), "count_include_pad": int(count_include_pad)}
    return apply("AveragePool", [x], attrs)


def adaptive_avg_pool2d(x, output_size) -> Tensor:
    """Average over equal windows; ``output_size`` must divide the input size (else an error)."""
    out = _pair(output_size, "output_size")
    if out == [1, 1]:
        return apply("GlobalAveragePool", [x])
    h, w = x.shape[2:]
    if h % out[0] or w % out[1]:
        raise _error(f"adaptive_avg_pool2d: output size {out} does not divide the input size {[h, w]}")
    k = [h // out[0], w // out[1]]
    return apply("AveragePool", [x], {"kernel_shape": k, "strides": k})


# -- normalization and regularization --------------------------------------------------------------
def batch_norm(x, running_mean, running_var, weight, bias, training: bool = False, momentum: float = 0.1, eps: float = 1e-5):
    """Batch normalization over axis 1. In training it returns ``(y, new_mean, new_var)``.

    ``momentum`` weighs the new batch statistics (PyTorch's convention: new = (1 - m) * old + m *
    batch); the ONNX op it lowers to takes ``1 - momentum``.
    """
    attrs = {"epsilon": eps, "momentum": 1.0 - momentum, "training_mode": int(training)}
    return apply("BatchNormalization", [x, weight, bias, running_mean, running_var], attrs, num_outputs=3 if training else 1)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps: float = 1e-5) -> Tensor:
    n = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
    if weight is None:
        weight = Tensor(np.ones(x.shape[-n:], dtype=x.dtype.numpy))
    return apply("LayerNormalization", [x, weight, bias], {"axis": -n, "epsilon": eps}, num_outputs=1)


def group_norm(x, num_groups: int, weight, bias, eps: float = 1e-5) -> Tensor:
    return apply("GroupNormalization", [x, weight, bias], {"num_groups": num_groups, "epsilon": eps})


def dropout(x, p: float = 0.5, training: bool = False, seed: int = 0) -> Tensor:
    """Inverted dropout; the mask is drawn from MT19937 seeded by ``seed`` (reproducible).
    Outside training it is the identity (no node, as the ONNX importer has it)."""
    if not training or p == 0:
        return x
    return apply("Dropout", [x], {"ratio": p, "training_mode": int(training), "seed": seed}, num_outputs=1)


# -- resampling and lookup -------------------------------------------------------------------------
def interpolate(x, size=None, scale_factor=None, mode: str = "nearest", align_corners: bool | None = None) -> Tensor:
    """Resize the spatial dims of NCHW ``x`` to ``size`` or by ``scale_factor`` (PyTorch's rules)."""
    spatial = x.shape[2:]
    if (size is None) == (scale_factor is None):
        raise _error("interpolate: give exactly one of size and scale_factor")
    if size is not None:
        out = [size] * len(spatial) if isinstance(size, int) else list(size)
        scales = [o / i for o, i in zip(out, spatial)]
    else:
        scales = [float(scale_factor)] * len(spatial) if np.isscalar(scale_factor) else [float(s) for s in scale_factor]
        out = [int(np.floor(i * s)) for i, s in zip(spatial, scales)]
    attrs: dict[str, Any] = {"sizes": [*x.shape[:2], *out], "scales": [1.0, 1.0, *scales]}
    if mode == "nearest":
        if align_corners:
            raise _error("interpolate: align_corners applies to the linear modes only")
        attrs.update(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    elif mode in ("bilinear", "linear"):
        transform = "align_corners" if align_corners else "pytorch_half_pixel"
        attrs.update(mode="linear", coordinate_transformation_mode=transform)
    else:
        raise _error(f"interpolate: mode {mode!r} is not one of 'nearest', 'bilinear'")
    return apply("Resize", [x], attrs)


def embedding(indices, weight) -> Tensor:
    return apply("Gather", [weight, indices], {"axis": 0})


# -- shapes --------------------------------------------------------------------------------------------
def _shape_args(shape) -> list[int]:
    return list(shape[0]) if len(shape) == 1 and not isinstance(shape[0], int) else list(shape)


def reshape(x, *shape) -> Tensor:
    """Reshape to ``shape`` (one entry may be -1, as in numpy)."""
    target = _shape_args(shape)
    if target.count(-1) > 1:
        raise _error(f"reshape: at most one -1 in {target}")
    if -1 in target:
        known = int(np.prod([d for d in target if d != -1]))
        if known == 0 or x.size % known:
            raise _error(f"reshape: cannot reshape {list(x.shape)} into {target}")
        target[target.index(-1)] = x.size // known
    if list(x.shape) == target:
        return x
    return apply("Reshape", [x], {"shape": target})


def flatten(x, start_dim: int = 1, end_dim: int = -1) -> Tensor:
    rank = x.ndim or 1
    start, end = start_dim % rank, end_dim % rank
    merged = int(np.prod(x.shape[start : end + 1]))
    return reshape(x, [*x.shape[:start], merged, *x.shape[end + 1 :]])


def permute(x, *perm) -> Tensor:
    return apply("Transpose", [x], {"perm": [p % x.ndim for p in _shape_args(perm)]})


def transpose(x, dim0: int = 0, dim1: int = 1) -> Tensor:
    perm = list(range(x.ndim))
    perm[dim0], perm[dim1] = perm[dim1], perm[dim0]
    return permute(x, perm)


def unsqueeze(x, axis: int) -> Tensor:
    axis = axis % (x.ndim + 1)
    return reshape(x, [*x.shape[:axis], 1, *x.shape[axis:]])


def squeeze(x, axis: int | None = None) -> Tensor:
    if axis is None:
        return reshape(x, [d for d in x.shape if d != 1])
    axis %= x.ndim
    if x.shape[axis] != 1:
        raise _error(f"squeeze: axis {axis} of {list(x.shape)} is not 1")
    return reshape(x, [*x.shape[:axis], *x.shape[axis + 1 :]])


def expand(x, *shape) -> Tensor:
    return apply("Expand", [x], {"shape": _shape_args(shape)})


def concat(tensors: Sequence[Tensor], axis: int = 0) -> Tensor:
    return apply("Concat", list(tensors), {"axis": axis})


cat = concat


def split(x, sizes: int | Sequence[int], axis: int = 0) -> tuple[Tensor, ...]:
    """Split ``axis`` into pieces of ``sizes`` (or equal pieces of that length)."""
    dim = x.shape[axis]
    if isinstance(sizes, int):
        sizes = [sizes] * (dim // sizes) + ([dim % sizes] if dim % sizes else [])
    out = apply("Split", [x], {"axis": axis, "split": list(sizes)})
    return out if isinstance(out, tuple) else (out,)


def pad(x, pads: Sequence[int], mode: str = "constant", value: float = 0.0) -> Tensor:
    """``pads`` in ONNX order: all the begins, then all the ends."""
    return apply("Pad", [x, value if mode == "constant" else None], {"pads": list(pads), "mode": mode})


def astype(x, dtype) -> Tensor:
    to = dtype if isinstance(dtype, DType) else DType.from_numpy(np.dtype(dtype))
    return x if x.dtype == to else apply("Cast", [x], {"to": to.short})


def where(condition, x, y) -> Tensor:
    return apply("Where", [condition, x, y])


# -- reductions -------------------------------------------------------------------------------------
def _reduce(name: str):
    def reduce(x, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Tensor:
        axes = None if axis is None else [axis] if isinstance(axis, int) else list(axis)
        return apply(name, [x], {"axes": axes, "keepdims": int(keepdims)})

    reduce.__name__ = name
    reduce.__doc__ = f"{name} over ``axis`` (all axes when None)."
    return reduce


sum = _reduce("ReduceSum")  # noqa: A001  (the numpy names)
mean = _reduce("ReduceMean")
max = _reduce("ReduceMax")  # noqa: A001
min = _reduce("ReduceMin")  # noqa: A001
prod = _reduce("ReduceProd")


def argmax(x, axis: int = 0, keepdims: bool = False) -> Tensor:
    return apply("ArgMax", [x], {"axis": axis, "keepdims": int(keepdims)})


# -- losses ----------------------------------------------------------------------------------------------
def cross_entropy(logits, target, reduction: str = "mean") -> Tensor:
    """Softmax cross-entropy of (N, C) ``logits`` against int64 class indices ``target``."""
    return apply("SoftmaxCrossEntropyLoss", [logits, target], {"reduction": reduction}, num_outputs=1)


def mse_loss(prediction, target) -> Tensor:
    diff = prediction - target
    return mean(diff * diff)


# -- every op by its snake_case name ------------------------------------------------------------------
_SPECIAL = {"IsNaN": "isnan", "IsInf": "isinf", "PRelu": "prelu", "MatMul": "matmul", "TopK": "topk",
            "CumSum": "cumsum", "CumProd": "cumprod", "Col2Im": "col2im"}
_WORD = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def snake_name(op_name: str) -> str:
    """``ReduceMean`` -> ``reduce_mean``: the function name of an op."""
    return _SPECIAL.get(op_name) or _WORD.sub("_", op_name).lower()


def _op_function(name: str):
    def fn(*inputs: Any, num_outputs: int | None = None, **attrs: Any) -> Any:
        return apply(name, inputs, attrs, num_outputs)

    fn.__name__ = snake_name(name)
    fn.__doc__ = f"The IR op {name}: ``{snake_name(name)}(*inputs, **attrs)``."
    return fn


OP_FUNCTIONS: dict[str, Any] = {}  # op name -> its generated function (all ops but Fused)
for _name in sorted(all_ops()):
    if _name == "Fused":
        continue  # made by the fusion pass, not by users
    OP_FUNCTIONS[_name] = _op_function(_name)
    globals().setdefault(snake_name(_name), OP_FUNCTIONS[_name])

TENSOR_METHODS = {
    name: globals()[name]
    for name in (
        "reshape", "flatten", "permute", "transpose", "unsqueeze", "squeeze", "expand", "astype",
        "sum", "mean", "max", "min", "prod", "argmax", "matmul", "relu", "sigmoid", "tanh",
        "softmax", "log_softmax", "clip", "exp", "log", "sqrt", "abs", "pad",
    )
}
TENSOR_METHODS["view"] = reshape
