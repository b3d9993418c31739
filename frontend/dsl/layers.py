"""The layers of ``kiln.nn``: PyTorch's names, arguments and default initializations.

Each lowers to IR ops through ``kiln.nn.functional``; parameter names and shapes follow
PyTorch where the IR op agrees (Conv, Linear, norms). The recurrent layers keep their weights
in the ONNX LSTM/GRU layout, since that is the op they lower to (see ``LSTM``).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from kiln.errors import KilnError
from kiln.frontend.dsl import functional as F
from kiln.frontend.dsl import init
from kiln.frontend.dsl.module import Module, Parameter
from kiln.frontend.dsl.tensor import Tensor, apply, current_tracer


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _uniform_fan_in(shape, fan_in: int) -> np.ndarray:
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return init.uniform(shape, -bound, bound)


class Linear(Module):
    """``y = x @ weight.T + bias``; weight (out_features, in_features)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(init.kaiming_uniform((out_features, in_features), a=math.sqrt(5)))
        self.bias = Parameter(_uniform_fan_in((out_features,), in_features)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"


class Conv2d(Module):
    """2-D convolution over NCHW; weight (out, in/groups, kH, kW)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1, groups: int = 1, bias: bool = True):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise KilnError(f"Conv2d: groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        k = _pair(kernel_size)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.weight = Parameter(init.kaiming_uniform((out_channels, in_channels // groups, *k), a=math.sqrt(5)))
        fan_in = in_channels // groups * k[0] * k[1]
        self.bias = Parameter(_uniform_fan_in((out_channels,), fan_in)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        o, i, kh, kw = self.weight.shape
        return f"{i * self.groups}, {o}, kernel_size=({kh}, {kw}), stride={self.stride}, padding={self.padding}, dilation={self.dilation}, groups={self.groups}"


class ConvTranspose2d(Module):
    """Transposed 2-D convolution; weight (in, out/groups, kH, kW)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, output_padding=0, groups: int = 1, bias: bool = True, dilation=1):
        super().__init__()
        k = _pair(kernel_size)
        self.stride, self.padding, self.output_padding, self.groups, self.dilation = stride, padding, output_padding, groups, dilation
        self.weight = Parameter(init.kaiming_uniform((in_channels, out_channels // groups, *k), a=math.sqrt(5)))
        fan_in = out_channels // groups * k[0] * k[1]
        self.bias = Parameter(_uniform_fan_in((out_channels,), fan_in)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.conv_transpose2d(x, self.weight, self.bias, self.stride, self.padding, self.output_padding, self.groups, self.dilation)


class BatchNorm2d(Module):
    """Batch normalization over channels; running statistics are buffers.

    In training mode an eager call updates ``running_mean``/``running_var`` (momentum as in
    PyTorch); a traced call records the update on the tracer (``Tracer.updates``).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = Parameter(init.ones((num_features,)))
        self.bias = Parameter(init.zeros((num_features,)))
        self.register_buffer("running_mean", init.zeros((num_features,)))
        self.register_buffer("running_var", init.ones((num_features,)))

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, self.momentum, self.eps)
        y, mean, var = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True, self.momentum, self.eps)
        tracer = current_tracer()
        if tracer is None:
            self.set_buffer("running_mean", mean)
            self.set_buffer("running_var", var)
        else:
            tracer.record_update(self.running_mean, mean)
            tracer.record_update(self.running_var, var)
        return y


class GroupNorm(Module):
    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5):
        super().__init__()
        if num_channels % num_groups:
            raise KilnError(f"GroupNorm: num_groups={num_groups} must divide num_channels={num_channels}")
        self.num_groups, self.eps = num_groups, eps
        self.weight = Parameter(init.ones((num_channels,)))
        self.bias = Parameter(init.zeros((num_channels,)))

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class LayerNorm(Module):
    def __init__(self, normalized_shape: int | Sequence[int], eps: float = 1e-5):
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.normalized_shape, self.eps = shape, eps
        self.weight = Parameter(init.ones(shape))
        self.bias = Parameter(init.zeros(shape))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class Dropout(Module):
    """Inverted dropout in training mode, identity in eval mode; each call draws a new seed."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0 <= p < 1:
            raise KilnError(f"Dropout: p={p} is outside [0, 1)")
        self.p = p
        self._rng = np.random.default_rng(int(init.generator().integers(2**31)))

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        return F.dropout(x, self.p, True, seed=int(self._rng.integers(2**31)))


class MaxPool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False):
        super().__init__()
        self.args = (kernel_size, stride, padding, dilation, ceil_mode)

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(x, *self.args)


class AvgPool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode: bool = False, count_include_pad: bool = True):
        super().__init__()
        self.args = (kernel_size, stride, padding, ceil_mode, count_include_pad)

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, *self.args)


class AdaptiveAvgPool2d(Module):
    def __init__(self, output_size):
        super().__init__()
        self.output_size = output_size

    def forward(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(x, self.output_size)


class Upsample(Module):
    """Nearest or bilinear resizing (``align_corners`` as in PyTorch)."""

    def __init__(self, size=None, scale_factor=None, mode: str = "nearest", align_corners: bool | None = None):
        super().__init__()
        self.size, self.scale_factor, self.mode, self.align_corners = size, scale_factor, mode, align_corners

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, self.size, self.scale_factor, self.mode, self.align_corners)


class Embedding(Module):
    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.weight = Parameter(init.normal((num_embeddings, embedding_dim)))

    def forward(self, indices: Tensor) -> Tensor:
        return F.embedding(indices, self.weight)


class _Recurrent(Module):
    """Shared body of LSTM and GRU: one ONNX op per layer, both directions in one op.

    Parameters per layer ``k``: ``weight_ih_l{k}`` (dirs, G*H, in), ``weight_hh_l{k}``
    (dirs, G*H, H) and ``bias_l{k}`` (dirs, 2*G*H), gates in ONNX order (LSTM: i, o, f, c;
    GRU: z, r, h). Input (batch, seq, features) with ``batch_first`` else (seq, batch, features);
    returns ``(output, h_n)`` for GRU and ``(output, (h_n, c_n))`` for LSTM with h_n/c_n of shape
    (layers * dirs, batch, hidden), as PyTorch does.
    """

    op = ""
    gates = 0

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, batch_first: bool = False, bidirectional: bool = False):
        super().__init__()
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.batch_first, self.directions = batch_first, 2 if bidirectional else 1
        bound = 1.0 / math.sqrt(hidden_size)
        g, d = self.gates * hidden_size, self.directions
        for k in range(num_layers):
            width = input_size if k == 0 else hidden_size * d
            setattr(self, f"weight_ih_l{k}", Parameter(init.uniform((d, g, width), -bound, bound)))
            setattr(self, f"weight_hh_l{k}", Parameter(init.uniform((d, g, hidden_size), -bound, bound)))
            setattr(self, f"bias_l{k}", Parameter(init.uniform((d, 2 * g), -bound, bound)))

    def _attrs(self) -> dict:
        return {"hidden_size": self.hidden_size, "direction": "bidirectional" if self.directions == 2 else "forward"}

    def forward(self, x: Tensor):
        if x.ndim != 3:
            raise KilnError(f"{self.op}: input must be 3-D, got shape {list(x.shape)}")
        # the op runs time-major (layout 0: the layout every ONNX runtime supports)
        h = F.transpose(x, 0, 1) if self.batch_first else x
        finals: list[list[Tensor]] = []
        for k in range(self.num_layers):
            w, r, b = (getattr(self, f"{n}_l{k}") for n in ("weight_ih", "weight_hh", "bias"))
            outs = apply(self.op, [h, w, r, b], self._attrs(), num_outputs=3 if self.op == "LSTM" else 2)
            y = F.permute(outs[0], 0, 2, 1, 3)  # (seq, dirs, batch, H) -> (seq, batch, dirs, H)
            h = F.reshape(y, [y.shape[0], y.shape[1], self.directions * self.hidden_size])
            finals.append(list(outs[1:]))  # (dirs, batch, H) each
        output = F.transpose(h, 0, 1) if self.batch_first else h
        states = [F.concat([f[i] for f in finals], axis=0) if len(finals) > 1 else finals[0][i] for i in range(len(finals[0]))]
        return output, (states[0] if len(states) == 1 else tuple(states))


class LSTM(_Recurrent):
    op, gates = "LSTM", 4


class GRU(_Recurrent):
    op, gates = "GRU", 3

    def _attrs(self) -> dict:
        return {**super()._attrs(), "linear_before_reset": 1}  # PyTorch's GRU formulation


# -- activations and shape layers ---------------------------------------------------------------------
def _activation(name: str, fn, doc: str):
    cls = type(name, (Module,), {"forward": lambda self, x: fn(x), "__doc__": doc})
    return cls


ReLU = _activation("ReLU", F.relu, "max(x, 0)")
ReLU6 = _activation("ReLU6", F.relu6, "min(max(x, 0), 6)")
Sigmoid = _activation("Sigmoid", F.sigmoid, "1 / (1 + exp(-x))")
Tanh = _activation("Tanh", F.tanh, "tanh(x)")
GELU = _activation("GELU", F.gelu, "x * Phi(x)")
SiLU = _activation("SiLU", F.silu, "x * sigmoid(x)")
Identity = _activation("Identity", lambda x: x, "returns its input")


class LeakyReLU(Module):
    def __init__(self, negative_slope: float = 0.01):
        super().__init__()
        self.negative_slope = negative_slope

    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(x, self.negative_slope)


class Softmax(Module):
    def __init__(self, dim: int = -1):
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return F.softmax(x, self.dim)


class Flatten(Module):
    def __init__(self, start_dim: int = 1, end_dim: int = -1):
        super().__init__()
        self.start_dim, self.end_dim = start_dim, end_dim

    def forward(self, x: Tensor) -> Tensor:
        return F.flatten(x, self.start_dim, self.end_dim)
