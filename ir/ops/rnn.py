"""Recurrent layers: RNN, GRU and LSTM with ONNX's gate layouts, directions and sequence lengths,
and onnxruntime's DynamicQuantizeLSTM (an LSTM whose products are 8-bit).

Gate blocks in W/R/B follow ONNX: LSTM ``i, o, f, c``; GRU ``z, r, h``; RNN one block.
The eager reference runs in float64, one time step at a time.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from kiln.ir.dtypes import FLOATS, DType
from kiln.ir.opdef import OpDef, OpKind, register
from kiln.ir.ops.quant import dynamic_quantized, integer_matmul
from kiln.ir.ops.rules import check_dtype, fail, present
from kiln.ir.types import TensorType

RNN_ATTRS = {
    "hidden_size": None,
    "direction": "forward",
    "activations": None,
    "activation_alpha": None,
    "activation_beta": None,
    "clip": None,
    "layout": 0,
}
GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}
DEFAULT_ACTIVATIONS = {"RNN": ["Tanh"], "GRU": ["Sigmoid", "Tanh"], "LSTM": ["Sigmoid", "Tanh", "Tanh"]}
DEFAULT_ALPHA = {"LeakyRelu": 0.01, "ThresholdedRelu": 1.0, "Elu": 1.0, "HardSigmoid": 0.2, "ScaledTanh": 1.0, "Affine": 1.0}
DEFAULT_BETA = {"HardSigmoid": 0.5, "ScaledTanh": 1.0, "Affine": 0.0}


def _activation(name: str, alpha: float | None, beta: float | None) -> Callable[[np.ndarray], np.ndarray]:
    a = DEFAULT_ALPHA.get(name, 0.0) if alpha is None else alpha
    b = DEFAULT_BETA.get(name, 0.0) if beta is None else beta
    table: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "Relu": lambda x: np.maximum(x, 0),
        "Tanh": np.tanh,
        "Sigmoid": lambda x: 1 / (1 + np.exp(-x)),
        "Affine": lambda x: a * x + b,
        "LeakyRelu": lambda x: np.where(x >= 0, x, a * x),
        "ThresholdedRelu": lambda x: np.where(x > a, x, 0),
        "ScaledTanh": lambda x: a * np.tanh(b * x),
        "HardSigmoid": lambda x: np.clip(a * x + b, 0, 1),
        "Elu": lambda x: np.where(x >= 0, x, a * (np.exp(x) - 1)),
        "Softsign": lambda x: x / (1 + np.abs(x)),
        "Softplus": lambda x: np.log1p(np.exp(x)),
    }
    key = next((k for k in table if k.lower() == name.lower()), None)
    if key is None:
        raise fail(f"unknown recurrent activation {name!r}")
    return table[key]


def _directions(attrs) -> int:
    if attrs["direction"] not in ("forward", "reverse", "bidirectional"):
        raise fail(f"direction {attrs['direction']!r} is not forward, reverse or bidirectional")
    return 2 if attrs["direction"] == "bidirectional" else 1


def _rnn_infer(op: str):
    def infer(attrs, types):
        x, w, r = present(types, 0, "X"), present(types, 1, "W"), present(types, 2, "R")
        check_dtype(x, FLOATS, "X")
        dirs = _directions(attrs)
        hidden = attrs["hidden_size"] or r.shape[-1]
        if x.rank != 3:
            raise fail(f"X {x} must be 3-D")
        seq, batch = (x.shape[1], x.shape[0]) if attrs["layout"] else (x.shape[0], x.shape[1])
        g = GATES[op]
        if w.shape != (dirs, g * hidden, x.shape[2]) or r.shape != (dirs, g * hidden, hidden):
            raise fail(f"W {w} / R {r} do not match {dirs} direction(s), {g} gate(s), hidden {hidden}, input {x.shape[2]}")
        n_act = len(DEFAULT_ACTIVATIONS[op])
        if attrs["activations"] is not None and len(attrs["activations"]) != n_act * dirs:
            raise fail(f"needs {n_act * dirs} activations, got {attrs['activations']}")
        if attrs["layout"]:
            y, h = (batch, seq, dirs, hidden), (batch, dirs, hidden)
        else:
            y, h = (seq, dirs, batch, hidden), (dirs, batch, hidden)
        outs = [TensorType(y, x.dtype), TensorType(h, x.dtype)]
        return outs + [TensorType(h, x.dtype)] if op == "LSTM" else outs

    return infer


def _float_products(x: np.ndarray, w: np.ndarray, r: np.ndarray):
    """The two products of direction d, in float64: every time step's input projection
    (seq, batch, gates * hidden) and the recurrent one of a state."""
    return (lambda d: x @ w[d].astype(np.float64).T), (lambda d, h: h @ r[d].astype(np.float64).T)


def _run_rnn(op: str, a, x, w, r, b=None, seq_lens=None, h0=None, c0=None, p=None, products=_float_products):
    dirs = _directions(a)
    g = GATES[op]
    dtype = x.dtype
    x = x.astype(np.float64)
    if a["layout"]:
        x = x.transpose(1, 0, 2)
        h0 = h0.transpose(1, 0, 2) if h0 is not None else None
        c0 = c0.transpose(1, 0, 2) if c0 is not None else None
    seq, batch, _ = x.shape
    hidden = a["hidden_size"] or r.shape[-1]
    names = a["activations"] or DEFAULT_ACTIVATIONS[op] * dirs
    alphas = list(a["activation_alpha"] or [])
    betas = list(a["activation_beta"] or [])
    fns = []
    for i, name in enumerate(names):
        fns.append(_activation(name, alphas[i] if i < len(alphas) else None, betas[i] if i < len(betas) else None))
    per_dir = len(DEFAULT_ACTIVATIONS[op])
    lens = seq_lens.astype(np.int64) if seq_lens is not None else np.full(batch, seq)
    clip = a["clip"]

    def clipped(v: np.ndarray) -> np.ndarray:
        return np.clip(v, -clip, clip) if clip is not None else v

    project_x, project_h = products(x, w, r)
    y = np.zeros((seq, dirs, batch, hidden))
    y_h = np.zeros((dirs, batch, hidden))
    y_c = np.zeros((dirs, batch, hidden))
    for d in range(dirs):
        f = fns[d * per_dir : (d + 1) * per_dir]
        rd = r[d].astype(np.float64) if op == "GRU" else None
        gx_all = project_x(d)
        bd = b[d].astype(np.float64) if b is not None else np.zeros(2 * g * hidden)
        wb, rb = bd[: g * hidden], bd[g * hidden :]
        h = h0[d].astype(np.float64) if h0 is not None else np.zeros((batch, hidden))
        c = c0[d].astype(np.float64) if c0 is not None else np.zeros((batch, hidden))
        pd = p[d].astype(np.float64) if p is not None else np.zeros(3 * hidden)
        reverse = a["direction"] == "reverse" or d == 1
        for step in range(seq):
            # each batch row walks its own valid prefix, backwards for the reverse direction
            t = lens - 1 - step if reverse else np.full(batch, step)
            active = step < lens
            tt = np.clip(t, 0, seq - 1)
            gx = gx_all[tt, np.arange(batch)] + wb
            # a row past its length by the last step enters the product as zeros (the float
            # product's rows are dropped either way; a quantized one's range is onnxruntime's)
            gh = project_h(d, np.where((step - 1 < lens)[:, None], h, 0))
            if op == "RNN":
                h_new = f[0](clipped(gx + gh + rb))
                c_new = c
            elif op == "GRU":
                hs = hidden
                z = f[0](clipped(gx[:, :hs] + gh[:, :hs] + rb[:hs]))
                rr = f[0](clipped(gx[:, hs : 2 * hs] + gh[:, hs : 2 * hs] + rb[hs : 2 * hs]))
                if a["linear_before_reset"]:
                    cand = gx[:, 2 * hs :] + rr * (gh[:, 2 * hs :] + rb[2 * hs :])
                else:
                    cand = gx[:, 2 * hs :] + (rr * h) @ rd[2 * hs :].T + rb[2 * hs :]
                hh = f[1](clipped(cand))
                h_new = (1 - z) * hh + z * h
                c_new = c
            else:
                hs = hidden
                pre = gx + gh + rb
                i = f[0](clipped(pre[:, :hs] + pd[:hs] * c))
                fg = f[0](clipped(pre[:, 2 * hs : 3 * hs] + pd[2 * hs :] * c))
                if a["input_forget"]:
                    fg = 1 - i
                cc = f[1](clipped(pre[:, 3 * hs :]))
                c_new = fg * c + i * cc
                o = f[0](clipped(pre[:, hs : 2 * hs] + pd[hs : 2 * hs] * c_new))
                h_new = o * f[2](c_new)
            h = np.where(active[:, None], h_new, h)
            c = np.where(active[:, None], c_new, c)
            rows = np.nonzero(active)[0]
            y[tt[rows], d, rows] = h[rows]
        y_h[d], y_c[d] = h, c
    if a["layout"]:
        outs = [y.transpose(2, 0, 1, 3), y_h.transpose(1, 0, 2), y_c.transpose(1, 0, 2)]
    else:
        outs = [y, y_h, y_c]
    return tuple(o.astype(dtype) for o in outs[: 3 if op == "LSTM" else 2])


def _register(op: str, extra: dict, max_inputs: int) -> None:
    register(
        OpDef(
            op,
            OpKind.HEAVY,
            _rnn_infer(op),
            lambda a, *xs: _run_rnn(op, a, *xs),
            {**RNN_ATTRS, **extra},
            num_inputs=(3, max_inputs),
            num_outputs=(1, 3 if op == "LSTM" else 2),
        )
    )


_register("RNN", {}, 6)
_register("GRU", {"linear_before_reset": 0}, 6)
_register("LSTM", {"input_forget": 0}, 8)


# DynamicQuantizeLSTM (com.microsoft): LSTM's inputs, but W (dirs, input, 4 * hidden) and R
# (dirs, hidden, 4 * hidden) are 8-bit, transposed, and dequantized by inputs 8-11: W_scale,
# W_zero_point, R_scale, R_zero_point (per direction, or per direction and gate column). Each
# product quantizes its float operand to uint8 as it runs, as onnxruntime does on one thread:
# the input projection once over every time step up to the longest sequence, the recurrent one
# once per step over the state of every batch row, rows that ended before the last step as
# zeros. (onnxruntime on several threads quantizes each thread's block of batch rows apart.)
QUANTIZED_LSTM_INPUTS = ("X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P", "W_scale", "W_zero_point", "R_scale", "R_zero_point")


def _quantized_lstm_infer(attrs, types):
    types = list(types) + [None] * (12 - len(types))
    w, r = present(types, 1, "W"), present(types, 2, "R")
    for t, what in ((w, "W"), (r, "R")):
        check_dtype(t, (DType.int8, DType.uint8), what)
        if t.rank != 3:
            raise fail(f"{what} {t} must be 3-D: (directions, inputs, 4 * hidden)")
    for scale, zero, weight, what in ((types[8], types[9], w, "W"), (types[10], types[11], r, "R")):
        if scale is None:
            raise fail(f"{what}_scale is required")
        check_dtype(scale, FLOATS, f"{what}_scale")
        if scale.shape not in ((weight.shape[0],), (weight.shape[0], weight.shape[2])):
            raise fail(f"{what}_scale {scale} must have shape ({weight.shape[0]},) or ({weight.shape[0]}, {weight.shape[2]})")
        if zero is not None and (zero.dtype != weight.dtype or zero.shape != scale.shape):
            raise fail(f"{what}_zero_point {zero} must have {what}'s dtype {weight.dtype.short} and {what}_scale's shape {scale.shape}")
    as_float = [t.with_dtype(DType.float32) for t in (w, r)]
    lstm_types = [types[0], *(t.with_shape((t.shape[0], t.shape[2], t.shape[1])) for t in as_float), *types[3:8]]
    return _rnn_infer("LSTM")({**attrs, "layout": 0}, lstm_types)


def _quantized_products(seq_lens, w_scale, w_zero, r_scale, r_zero):
    """DynamicQuantizeLSTM's two products: each float operand quantized by ``dynamic_quantized``,
    the exact integer sums scaled by the float32 product of the two scales."""

    def scaled_sums(aq, a_scale, a_zero, q, scale, zero, d):
        wd = q[d].astype(np.int64) - (zero[d].astype(np.int64) if zero is not None else 0)
        sums = integer_matmul(aq.astype(np.int64) - np.int64(a_zero), wd)
        return sums * (a_scale * scale[d].astype(np.float32)).astype(np.float64)

    def products(x, w, r):
        # the steps past the longest sequence as zeros: the range is the longest sequence's steps'
        # (0 is in it anyway), and no row reads those steps' products
        steps = int(seq_lens.max(initial=0)) if seq_lens is not None else x.shape[0]
        quantized = dynamic_quantized(np.where(np.arange(x.shape[0])[:, None, None] < steps, x, 0))
        project_x = lambda d: scaled_sums(*quantized, w, w_scale, w_zero, d)  # noqa: E731
        return project_x, lambda d, h: scaled_sums(*dynamic_quantized(h), r, r_scale, r_zero, d)

    return products


def _run_quantized_lstm(a, x, w, r, b=None, seq_lens=None, h0=None, c0=None, p=None, w_scale=None, w_zero=None, r_scale=None, r_zero=None):
    products = _quantized_products(seq_lens, w_scale, w_zero, r_scale, r_zero)
    return _run_rnn("LSTM", {**a, "layout": 0, "hidden_size": r.shape[1]}, x, w, r, b, seq_lens, h0, c0, p, products=products)


register(
    OpDef(
        "DynamicQuantizeLSTM",
        OpKind.HEAVY,
        _quantized_lstm_infer,
        _run_quantized_lstm,
        {**{k: v for k, v in RNN_ATTRS.items() if k != "layout"}, "input_forget": 0},
        num_inputs=(11, 12),
        num_outputs=(1, 3),
    )
)

