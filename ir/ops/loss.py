"""Losses: NegativeLogLikelihoodLoss and SoftmaxCrossEntropyLoss (ONNX semantics)."""

from __future__ import annotations

import numpy as np

from kiln.ir.dtypes import FLOATS
from kiln.ir.opdef import OpDef, OpKind, register
from kiln.ir.ops.rules import check_dtype, fail, present
from kiln.ir.ops.shape import INDEX
from kiln.ir.types import TensorType

LOSS_ATTRS = {"reduction": "mean", "ignore_index": None}


def _loss_shape(attrs, x: TensorType, target: TensorType, weight: TensorType | None) -> TensorType:
    check_dtype(x, FLOATS, "input")
    check_dtype(target, INDEX, "target")
    if x.rank < 2 or target.shape != (x.shape[0],) + x.shape[2:]:
        raise fail(f"target {target} must have shape (N, d1, ...) of input {x} without its class axis")
    if weight is not None and weight.shape != (x.shape[1],):
        raise fail(f"weight {weight} must have shape ({x.shape[1]},)")
    if attrs["reduction"] not in ("none", "sum", "mean"):
        raise fail(f"reduction {attrs['reduction']!r} is not none, sum or mean")
    return x.with_shape(target.shape if attrs["reduction"] == "none" else ())


def _nll(attrs, log_prob: np.ndarray, target: np.ndarray, weight: np.ndarray | None) -> np.ndarray:
    ignore = attrs["ignore_index"]
    t = target.astype(np.int64)
    mask = np.ones(t.shape, dtype=bool) if ignore is None else t != ignore
    safe = np.where(mask, t, 0)
    picked = np.take_along_axis(log_prob.astype(np.float64), np.expand_dims(safe, 1), axis=1)[:, 0]
    w = weight.astype(np.float64)[safe] if weight is not None else np.ones(t.shape)
    w = np.where(mask, w, 0.0)
    loss = -picked * w
    if attrs["reduction"] == "none":
        out = loss
    elif attrs["reduction"] == "sum":
        out = loss.sum()
    else:
        out = loss.sum() / w.sum()
    return np.asarray(out, dtype=log_prob.dtype)


def _nll_infer(attrs, types):
    x, t = present(types, 0, "input"), present(types, 1, "target")
    return [_loss_shape(attrs, x, t, types[2] if len(types) > 2 else None)]


register(
    OpDef(
        "NegativeLogLikelihoodLoss",
        OpKind.OPAQUE,
        _nll_infer,
        lambda a, x, t, w=None: _nll(a, x, t, w),
        LOSS_ATTRS,
        num_inputs=(2, 3),
    )
)


def _sce_infer(attrs, types):
    x, t = present(types, 0, "scores"), present(types, 1, "labels")
    return [_loss_shape(attrs, x, t, types[2] if len(types) > 2 else None), x]


def _sce(attrs, scores, labels, weight=None):
    x64 = scores.astype(np.float64)
    shifted = x64 - x64.max(axis=1, keepdims=True)
    log_prob = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return _nll(attrs, log_prob, labels, weight).astype(scores.dtype), log_prob.astype(scores.dtype)


register(
    OpDef(
        "SoftmaxCrossEntropyLoss",
        OpKind.OPAQUE,
        _sce_infer,
        _sce,
        LOSS_ATTRS,
        num_inputs=(2, 3),
        num_outputs=(1, 2),
    )
)
