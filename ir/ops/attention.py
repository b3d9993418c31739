"""Scaled dot-product attention (ONNX Attention, opsets 23-25): multi-head and grouped-query,
3-D (heads packed in the hidden axis) or 4-D inputs, boolean or additive masks, causal and
sliding-window masking, a KV cache (past_key/past_value) and per-batch valid lengths.

The reference computes in the input dtype, as ONNX's does, so float16 results match it.
"""

from __future__ import annotations

import numpy as np

from kiln.ir.dtypes import DType, FLOATS
from kiln.ir.opdef import OpDef, OpKind, register
from kiln.ir.ops.rules import check_dtype, fail, present, same_dtype
from kiln.ir.types import TensorType

ATTRS = {
    "is_causal": 0,
    "q_num_heads": None,
    "kv_num_heads": None,
    "qk_matmul_output_mode": 0,
    "scale": None,
    "softcap": 0.0,
    "softmax_precision": None,
    "left_window_size": -1,
    "right_window_size": -1,
}


def _geometry(attrs, q, k, v, past):
    """(batch, q_heads, kv_heads, q_len, kv_len_total, head_size, v_head_size)."""
    if not q.rank == k.rank == v.rank or q.rank not in (3, 4):
        raise fail(f"Q {q}, K {k}, V {v} must all be 3-D or all 4-D")
    if q.rank == 3:
        hq, hkv = attrs["q_num_heads"], attrs["kv_num_heads"]
        if not hq or not hkv:
            raise fail("3-D inputs need q_num_heads and kv_num_heads")
        if q.shape[2] % hq or k.shape[2] % hkv or v.shape[2] % hkv:
            raise fail(f"hidden sizes of Q {q}, K {k}, V {v} do not split into {hq}/{hkv} heads")
        batch, sq, skv = q.shape[0], q.shape[1], k.shape[1]
        d, dv = q.shape[2] // hq, v.shape[2] // hkv
    else:
        batch, hq, sq, d = q.shape
        hkv, skv, dv = k.shape[1], k.shape[2], v.shape[3]
    if k.shape[0] != batch or v.shape[0] != batch or hq % hkv:
        raise fail(f"Q {q}, K {k}, V {v}: batch sizes or head counts ({hq} query, {hkv} kv) do not fit")
    total = skv + (past.shape[2] if past is not None else 0)
    return batch, hq, hkv, sq, total, d, dv


def _infer(attrs, types):
    q, k, v = (present(types, i, n) for i, n in enumerate(("Q", "K", "V")))
    check_dtype(q, FLOATS, "Q")
    same_dtype([q, k, v])
    past = types[4] if len(types) > 4 else None
    batch, hq, hkv, sq, total, d, dv = _geometry(attrs, q, k, v, past)
    y = (batch, sq, hq * dv) if q.rank == 3 else (batch, hq, sq, dv)
    return [
        TensorType(y, q.dtype),
        TensorType((batch, hkv, total, d), q.dtype),
        TensorType((batch, hkv, total, dv), q.dtype),
        TensorType((batch, hq, sq, total), q.dtype),
    ]


def _heads(x: np.ndarray, heads: int) -> np.ndarray:
    """(B, S, H*D) -> (B, H, S, D)."""
    b, s, hidden = x.shape
    return x.reshape(b, s, heads, hidden // heads).transpose(0, 2, 1, 3)


def _masked(allowed: np.ndarray, dtype) -> np.ndarray:
    return np.where(allowed, dtype.type(0), dtype.type(-np.inf))


def window_allows(a, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Which (query position ``i``, key position ``j``) pairs the causal and sliding-window
    limits allow, broadcast over both."""
    allowed = np.ones(np.broadcast_shapes(i.shape, j.shape), dtype=bool)
    if a["is_causal"]:
        allowed &= j <= i
    if a["left_window_size"] >= 0:
        allowed &= i - j <= a["left_window_size"]
    if a["right_window_size"] >= 0:
        allowed &= j - i <= a["right_window_size"]
    return allowed


def _eager(a, q, k, v, mask=None, past_key=None, past_value=None, nonpad=None):
    three_d = q.ndim == 3
    if three_d:
        q, k, v = _heads(q, a["q_num_heads"]), _heads(k, a["kv_num_heads"]), _heads(v, a["kv_num_heads"])
    dtype = q.dtype
    scale = a["scale"] if a["scale"] is not None else 1 / np.sqrt(q.shape[3])
    root = dtype.type(np.sqrt(scale))  # Q and K are each scaled by sqrt(scale), as ONNX does
    if past_key is not None:
        k = np.concatenate([past_key, k], axis=2)
        v = np.concatenate([past_value, v], axis=2)
    present_key, present_value = k, v
    sq, skv = q.shape[2], k.shape[2]

    # the additive bias: the mask (padded to the KV length), causal and window limits, padding
    bias = np.zeros((sq, skv), dtype=dtype)
    if mask is not None:
        missing = skv - mask.shape[-1]
        if missing > 0:
            fill = False if mask.dtype == np.bool_ else -np.inf
            mask = np.pad(mask, [(0, 0)] * (mask.ndim - 1) + [(0, missing)], constant_values=fill)
        bias = bias + (_masked(mask, dtype) if mask.dtype == np.bool_ else mask.astype(dtype))
    if past_key is not None:
        offset = np.asarray(past_key.shape[2])
    elif nonpad is not None:
        offset = nonpad.reshape(-1).astype(np.int64) - sq
    else:
        offset = np.asarray(0)
    per_batch = offset.ndim > 0
    i = np.arange(sq).reshape(sq, 1) + (offset.reshape(-1, 1, 1) if per_batch else int(offset))
    limits = _masked(window_allows(a, i, np.arange(skv).reshape(1, skv)), dtype)
    bias = bias + (limits.reshape(limits.shape[0], 1, sq, skv) if per_batch else limits)
    if nonpad is not None:
        valid = np.arange(skv) < nonpad.reshape(-1, 1)
        bias = bias + _masked(valid, dtype).reshape(-1, 1, 1, skv)

    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = np.repeat(k, groups, axis=1), np.repeat(v, groups, axis=1)
    scores = np.matmul(q * root, np.swapaxes(k, 2, 3) * root)
    if a["softcap"] and a["softcap"] > 0:
        scores = np.tanh(scores / a["softcap"]) * a["softcap"]
    biased = scores + bias
    mode = a["qk_matmul_output_mode"]
    qk_out = biased if mode == 2 else scores
    biased = biased.astype(DType.parse(a["softmax_precision"]).numpy) if a["softmax_precision"] else biased
    top = np.max(biased, axis=-1, keepdims=True)
    e = np.exp(biased - np.where(np.isneginf(top), 0, top))
    total = np.sum(e, axis=-1, keepdims=True)
    probs = e / np.where(total == 0, 1, total)
    dead_rows = np.isneginf(np.max(bias, axis=-1, keepdims=True))
    probs = np.where(dead_rows, 0, probs)
    if mode == 3:
        qk_out = probs
    y = np.matmul(probs.astype(dtype), v)
    if three_d:
        y = y.transpose(0, 2, 1, 3).reshape(y.shape[0], y.shape[2], -1)
    qk_out = np.broadcast_to(qk_out, (q.shape[0], q.shape[1], sq, skv)).astype(dtype)
    return y.astype(dtype), present_key, present_value, qk_out


register(OpDef("Attention", OpKind.HEAVY, _infer, _eager, ATTRS, num_inputs=(3, 7), num_outputs=(1, 4)))
