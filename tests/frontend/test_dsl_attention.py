"""kiln.nn's MultiheadAttention and TransformerEncoderLayer: PyTorch's parameter names (a
PyTorch state_dict loads as it is), the attention formula against numpy, masks, and the same
numbers traced and compiled on llvm."""

from __future__ import annotations

import numpy as np
import pytest

import kiln
import kiln.nn as nn


def _softmax(s: np.ndarray) -> np.ndarray:
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _reference(layer: nn.MultiheadAttention, x: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Self-attention of x (N, L, E) from the layer's parameters, in float64."""
    state = {k: v.astype(np.float64) for k, v in layer.state_dict().items()}
    e, h = layer.embed_dim, layer.num_heads
    q, k, v = (x @ state["in_proj_weight"][i * e : (i + 1) * e].T + state["in_proj_bias"][i * e : (i + 1) * e] for i in range(3))
    split = lambda t: t.reshape(t.shape[0], t.shape[1], h, e // h).transpose(0, 2, 1, 3)  # noqa: E731
    scores = split(q) @ split(k).transpose(0, 1, 3, 2) / np.sqrt(e // h)
    if mask is not None:
        scores = scores + (np.where(mask, -np.inf, 0.0) if mask.dtype == bool else mask)
    weights = _softmax(scores)
    out = (weights @ split(v)).transpose(0, 2, 1, 3).reshape(x.shape)
    return out @ state["out_proj.weight"].T + state["out_proj.bias"], weights.mean(axis=1)


def test_parameters_carry_pytorchs_names_and_shapes():
    layer = nn.TransformerEncoderLayer(16, 4, 32)
    shapes = {name: array.shape for name, array in layer.state_dict().items()}
    assert shapes["self_attn.in_proj_weight"] == (48, 16) and shapes["self_attn.in_proj_bias"] == (48,)
    assert shapes["self_attn.out_proj.weight"] == (16, 16) and shapes["linear1.weight"] == (32, 16)
    assert {"norm1.weight", "norm2.bias", "linear2.bias"} <= set(shapes)


@pytest.mark.parametrize("mask", [None, "float", "bool"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_agrees_with_the_formula(mask, batch_first):
    rng = np.random.default_rng(0)
    layer = nn.MultiheadAttention(16, 4, batch_first=batch_first)
    layer.in_proj_bias = nn.Parameter(rng.standard_normal(48).astype(np.float32))  # (zeros at init)
    x = rng.standard_normal((3, 5, 16)).astype(np.float32)  # (N, L, E)
    m = {None: None, "float": rng.standard_normal((5, 5)).astype(np.float32), "bool": np.triu(np.ones((5, 5), bool), 1)}[mask]
    fed = x if batch_first else x.transpose(1, 0, 2)
    out, weights = layer(*(kiln.Tensor(fed),) * 3, attn_mask=None if m is None else kiln.Tensor(m))
    want, want_weights = _reference(layer, x.astype(np.float64), m)
    got = out.numpy() if batch_first else out.numpy().transpose(1, 0, 2)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(weights.numpy(), want_weights, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm_first, activation", [(False, "relu"), (True, "gelu")])
def test_an_encoder_layer_traces_and_compiles_to_the_same_numbers(norm_first, activation):
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, activation=activation, batch_first=True, norm_first=norm_first)
    layer.eval()
    x = np.random.default_rng(1).standard_normal((2, 7, 16)).astype(np.float32)
    want = layer(kiln.Tensor(x)).numpy()
    graph = kiln.trace(layer, [x], input_names=["input"])
    got = kiln.compile(graph, target="llvm").run({"input": x})
    np.testing.assert_allclose(next(iter(got.values())), want, rtol=1e-5, atol=1e-5)


def test_heads_must_divide_the_width():
    with pytest.raises(kiln.KilnError, match="num_heads=3"):
        nn.MultiheadAttention(16, 3)
