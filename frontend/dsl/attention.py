"""The attention layers of ``kiln.nn`` with PyTorch's names, arguments and parameters:
``MultiheadAttention`` (its packed in-projection ``in_proj_weight`` (3E, E) and ``in_proj_bias``,
then ``out_proj``, so a PyTorch state_dict loads as it is) and ``TransformerEncoderLayer``
(post-norm by default, ``norm_first`` for pre-norm). They lower to MatMul, Softmax and the
elementwise ops, which the passes fuse and the backends run like any others."""

from __future__ import annotations

import math

import numpy as np

from kiln.errors import KilnError
from kiln.frontend.dsl import functional as F
from kiln.frontend.dsl import init
from kiln.frontend.dsl.layers import Dropout, LayerNorm, Linear
from kiln.frontend.dsl.module import Module, Parameter
from kiln.frontend.dsl.tensor import Tensor


class MultiheadAttention(Module):
    """``softmax(q k^T / sqrt(head size) + attn_mask) v`` per head, the heads concatenated
    through ``out_proj``. Inputs are (L, N, E), or (N, L, E) with ``batch_first``. Returns
    (output, weights): the weights (N, L, S) averaged over the heads, per head (N, heads, L,
    S) without ``average_attn_weights``, None without ``need_weights``. ``attn_mask`` (L, S) is
    added to the scores, or where boolean, True marks the pairs left out (PyTorch's sense)."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True, batch_first: bool = False):
        super().__init__()
        if embed_dim % num_heads:
            raise KilnError(f"MultiheadAttention: embed_dim={embed_dim} does not split into num_heads={num_heads} heads")
        self.embed_dim, self.num_heads, self.batch_first = embed_dim, num_heads, batch_first
        self.in_proj_weight = Parameter(init.xavier_uniform((3 * embed_dim, embed_dim)))
        self.in_proj_bias = Parameter(init.zeros((3 * embed_dim,))) if bias else None
        self.out_proj = Linear(embed_dim, embed_dim, bias)
        if bias:
            self.out_proj.bias = Parameter(init.zeros((embed_dim,)))
        self.dropout = Dropout(dropout)

    def _heads(self, x: Tensor, part: int) -> Tensor:
        """Projection ``part`` (0 q, 1 k, 2 v) of x (N, L, E) as (N, heads, L, head size)."""
        e = self.embed_dim
        weight = self.in_proj_weight[part * e : (part + 1) * e]
        bias = self.in_proj_bias[part * e : (part + 1) * e] if self.in_proj_bias is not None else None
        n, length, _ = x.shape
        return F.permute(F.reshape(F.linear(x, weight, bias), n, length, self.num_heads, e // self.num_heads), 0, 2, 1, 3)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True):
        if not self.batch_first:
            query, key, value = (F.permute(t, 1, 0, 2) for t in (query, key, value))
        q, k, v = self._heads(query, 0), self._heads(key, 1), self._heads(value, 2)
        scores = (q @ F.permute(k, 0, 1, 3, 2)) * (1.0 / math.sqrt(self.embed_dim // self.num_heads))
        if attn_mask is not None:
            if attn_mask.dtype.name == "bool":
                attn_mask = F.where(attn_mask, Tensor(np.array(-np.inf, np.float32)), Tensor(np.array(0.0, np.float32)))
            scores = scores + attn_mask
        weights = F.softmax(scores, axis=-1)
        n, _, length, _ = q.shape
        out = self.out_proj(F.reshape(F.permute(self.dropout(weights) @ v, 0, 2, 1, 3), n, length, self.embed_dim))
        if not self.batch_first:
            out = F.permute(out, 1, 0, 2)
        if not need_weights:
            return out, None
        return out, (F.reduce_mean(weights, axes=[1], keepdims=0) if average_attn_weights else weights)

    def extra_repr(self) -> str:
        return f"{self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"


class TransformerEncoderLayer(Module):
    """Self-attention and a feed-forward (``dim_feedforward``, ReLU or GELU), each with dropout,
    a residual and LayerNorm: after (post-norm, PyTorch's default) or, with ``norm_first``,
    before each block."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1, activation: str = "relu",
                 layer_norm_eps: float = 1e-5, batch_first: bool = False, norm_first: bool = False, bias: bool = True):  # fmt: skip
        super().__init__()
        if activation not in ("relu", "gelu"):
            raise KilnError(f"TransformerEncoderLayer: activation {activation!r} is not 'relu' or 'gelu'")
        self.self_attn = MultiheadAttention(d_model, nhead, dropout, bias, batch_first)
        self.linear1, self.linear2 = Linear(d_model, dim_feedforward, bias), Linear(dim_feedforward, d_model, bias)
        self.norm1, self.norm2 = LayerNorm(d_model, eps=layer_norm_eps), LayerNorm(d_model, eps=layer_norm_eps)
        self.dropout, self.dropout1, self.dropout2 = Dropout(dropout), Dropout(dropout), Dropout(dropout)
        self.activation, self.norm_first = activation, norm_first

    def _attention(self, x: Tensor, mask: Tensor | None) -> Tensor:
        return self.dropout1(self.self_attn(x, x, x, need_weights=False, attn_mask=mask)[0])

    def _feed_forward(self, x: Tensor) -> Tensor:
        hidden = F.relu(self.linear1(x)) if self.activation == "relu" else F.gelu(self.linear1(x))
        return self.dropout2(self.linear2(self.dropout(hidden)))

    def forward(self, src: Tensor, src_mask: Tensor | None = None) -> Tensor:
        if self.norm_first:
            x = src + self._attention(self.norm1(src), src_mask)
            return x + self._feed_forward(self.norm2(x))
        x = self.norm1(src + self._attention(src, src_mask))
        return self.norm2(x + self._feed_forward(x))
