"""Attention (ONNX opsets 23-25) as MatMuls, a masked softmax and reshapes, for ``decompose``.

Follows the reference (``ir/ops/attention.py``) step by step: heads split out of 3-D inputs,
the KV cache concatenated, Q and K each scaled by sqrt(scale), grouped KV heads repeated, the
additive bias (mask, causal and window limits, per-batch valid lengths) added after the
optional softcap, a softmax whose fully masked rows give zeros, then the product with V.
Limits known at compile time become one constant; with ``nonpad_kv_seqlen`` (a runtime input)
they are computed from it.
"""

from __future__ import annotations

import numpy as np

from kiln.ir.dtypes import DType
from kiln.ir.graph import Node, Value
from kiln.ir.ops.attention import window_allows
from kiln.passes.autodiff import GradBuilder
from kiln.passes.decompose import padded_inputs, decomposition


def _heads(b: GradBuilder, x: Value, heads: int) -> Value:
    """(B, S, H*D) -> (B, H, S, D)."""
    batch, seq, hidden = x.type.shape
    return b.op("Transpose", b.reshape(x, [batch, seq, heads, hidden // heads]), perm=[0, 2, 1, 3])


def _repeat_heads(b: GradBuilder, x: Value, groups: int) -> Value:
    """(B, Hkv, S, D) -> (B, Hkv * groups, S, D), each head repeated ``groups`` times in place."""
    if groups == 1:
        return x
    batch, heads, seq, d = x.type.shape
    spread = b.op("Expand", b.reshape(x, [batch, heads, 1, seq, d]), shape=[batch, heads, groups, seq, d])
    return b.reshape(spread, [batch, heads * groups, seq, d])


def _param(b: GradBuilder, hint: str, array: np.ndarray) -> Value:
    return b.graph.add_param(b.graph.fresh_name(f"{b.where}.{hint}"), array)


def _additive(b: GradBuilder, allowed: Value, like: Value) -> Value:
    """0 where ``allowed``, -inf elsewhere, in ``like``'s dtype."""
    return b.op("Where", allowed, b.const(0.0, like), b.const(-np.inf, like))


def _mask_bias(b: GradBuilder, mask: Value, q: Value, kv_len: int) -> Value:
    """The attention mask as an additive bias, padded (masked) out to the KV length."""
    bias = _additive(b, mask, q) if mask.type.dtype == DType.bool else mask
    if bias.type.dtype != q.type.dtype:
        bias = b.op("Cast", bias, to=q.type.dtype.short)
    missing = kv_len - bias.type.shape[-1]
    if missing > 0:
        pads = [0] * (2 * bias.type.rank)
        pads[2 * bias.type.rank - 1] = missing
        bias = b.op("Pad", bias, b.const(-np.inf, q), pads=pads)
    return bias


def _limits(a, sq: int, skv: int, offset) -> np.ndarray | None:
    """Which (query, key) pairs causal and window limits allow, with query i at position
    i + offset; None when nothing is limited."""
    allowed = window_allows(a, np.arange(sq).reshape(sq, 1) + offset, np.arange(skv).reshape(1, skv))
    return None if allowed.all() else allowed


def _runtime_limits(b: GradBuilder, a, nonpad: Value, q: Value, sq: int, skv: int) -> Value:
    """The bias of per-batch valid lengths ``nonpad`` (B,): keys at or past the length are
    masked, and causal/window limits count query positions from ``length - sq``."""
    batch = nonpad.type.shape[0] if nonpad.type.rank else 1
    length = b.reshape(b.op("Cast", nonpad, to="i64"), [batch, 1, 1, 1])
    i = b.op("Add", _param(b, "rows", np.arange(sq, dtype=np.int64).reshape(1, 1, sq, 1)), b.op("Sub", length, b.const(sq, length)))
    j = _param(b, "cols", np.arange(skv, dtype=np.int64).reshape(1, 1, 1, skv))
    allowed = b.op("Less", j, length)
    conditions = []
    if a["is_causal"]:
        conditions.append(b.op("LessOrEqual", j, i))
    if a["left_window_size"] >= 0:
        conditions.append(b.op("LessOrEqual", b.op("Sub", i, j), b.const(a["left_window_size"], length)))
    if a["right_window_size"] >= 0:
        conditions.append(b.op("LessOrEqual", b.op("Sub", j, i), b.const(a["right_window_size"], length)))
    for condition in conditions:
        allowed = b.op("And", allowed, condition)
    return _additive(b, allowed, q)


@decomposition("Attention")
def _attention(b: GradBuilder, node: Node):
    a = node.attrs
    q, k, v, mask, past_key, past_value, nonpad = padded_inputs(node, 7)
    three_d = q.type.rank == 3
    if three_d:
        q, k, v = _heads(b, q, a["q_num_heads"]), _heads(b, k, a["kv_num_heads"]), _heads(b, v, a["kv_num_heads"])
    dtype = q.type.dtype
    scale = a["scale"] if a["scale"] is not None else 1 / np.sqrt(q.type.shape[3])
    root = b.const(float(np.sqrt(scale)), q)
    if past_key is not None:
        k = b.op("Concat", past_key, k, axis=2)
        v = b.op("Concat", past_value, v, axis=2)
    present_key, present_value = k, v
    batch, q_heads, sq = q.type.shape[:3]
    skv = k.type.shape[2]

    bias = None
    if mask is not None:
        bias = _mask_bias(b, mask, q, skv)
    if nonpad is not None:
        limits = _runtime_limits(b, a, nonpad, q, sq, skv)
        bias = limits if bias is None else b.op("Add", bias, limits)
    else:
        allowed = _limits(a, sq, skv, past_key.type.shape[2] if past_key is not None else 0)
        if allowed is not None:
            limits = _param(b, "limits", np.where(allowed, 0, -np.inf).astype(dtype.numpy))
            bias = limits if bias is None else b.op("Add", bias, limits)

    groups = q_heads // k.type.shape[1]
    k, v = _repeat_heads(b, k, groups), _repeat_heads(b, v, groups)
    scores = b.op("MatMul", b.op("Mul", q, root), b.op("Transpose", b.op("Mul", k, root), perm=[0, 1, 3, 2]))
    if a["softcap"] and a["softcap"] > 0:
        cap = b.const(a["softcap"], scores)
        scores = b.op("Mul", b.op("Tanh", b.op("Div", scores, cap)), cap)
    biased = scores if bias is None else b.op("Add", scores, bias)
    mode = a["qk_matmul_output_mode"]
    qk_out = biased if mode == 2 else scores
    if a["softmax_precision"]:
        wide = DType.parse(a["softmax_precision"])
        biased = biased if wide == dtype else b.op("Cast", biased, to=wide.short)
    # softmax over keys; a row with every key masked gives zeros (its exponentials all vanish)
    top = b.op("ReduceMax", biased, axes=[3], keepdims=1)
    shift = b.op("Where", b.op("IsInf", top, detect_positive=0), b.const(0.0, top), top)
    e = b.op("Exp", b.op("Sub", biased, shift))
    total = b.op("ReduceSum", e, axes=[3], keepdims=1)
    probs = b.op("Div", e, b.op("Where", b.op("Equal", total, b.const(0.0, total)), b.const(1.0, total), total))
    if mode == 3:
        qk_out = probs
    if probs.type.dtype != dtype:
        probs = b.op("Cast", probs, to=dtype.short)
    y = b.op("MatMul", probs, v)
    if three_d:
        y = b.reshape(b.op("Transpose", y, perm=[0, 2, 1, 3]), [batch, sq, q_heads * v.type.shape[3]])
    outputs = [y, present_key, present_value]
    if len(node.outputs) > 3:
        if qk_out.type.dtype != dtype:
            qk_out = b.op("Cast", qk_out, to=dtype.short)
        full = [batch, q_heads, sq, skv]
        outputs.append(qk_out if list(qk_out.type.shape) == full else b.op("Expand", qk_out, shape=full))
    return outputs[: len(node.outputs)]
