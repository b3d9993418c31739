"""Recurrent layers: RNN, GRU and LSTM with ONNX's gate layouts, directions and sequence lengths.

Gate blocks in W/R/B follow ONNX: LSTM ``i, o, f, c``; GRU ``z, r, h``; RNN one block.
The eager reference runs in float64, one time step at a time.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from kiln.ir.dtypes import FLOATS
from kiln.ir.opdef import OpDef, OpKind, register
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


def _run_rnn(op: str, a, x, w, r, b=None, seq_lens=None, h0=None, c0=None, p=None):
    dirs = _directions(a)
    g = GATES[op]
    dtype = x.dtype
    x = x.astype(np.float64)
    if a["layout"]:
        x = x.transpose(1, 0, 2)
        h0 = h0.transpose(1, 0, 2) if h0 is not None else None
        c0 = c0.transpose(1, 0, 2) if c0 is not None else None
    seq, batch, _ = x.shape
    hidden = r.shape[-1]
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

    y = np.zeros((seq, dirs, batch, hidden))
    y_h = np.zeros((dirs, batch, hidden))
    y_c = np.zeros((dirs, batch, hidden))
    for d in range(dirs):
        f = fns[d * per_dir : (d + 1) * per_dir]
        wd, rd = w[d].astype(np.float64), r[d].astype(np.float64)
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
            xt = x[tt, np.arange(batch)]
            gx = xt @ wd.T + wb
            gh = h @ rd.T
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

