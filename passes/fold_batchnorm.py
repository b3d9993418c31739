"""fold_batchnorm: inference BatchNormalization folded into the Conv, ConvTranspose or Gemm
before it, when that op's weights (and bias) are constants and nothing else reads its output.

Before: y = BN(conv(x, w, b))   with BN(z) = (z - mean) / sqrt(var + eps) * scale + shift
After:  y = conv(x, w * s, (b - mean) * s + shift)   with s = scale / sqrt(var + eps), per channel
"""

from __future__ import annotations

import numpy as np

from kiln.passes.pattern import Const, Emitter, Match, Maybe, Op, Var, rewrite_pass


def _inference(m: Match) -> bool:
    return not m.node("bn").attrs["training_mode"] and len(m.node("bn").outputs) == 1


def _bn(producer: Op) -> Op:
    return Op("BatchNormalization", producer, Const("scale"), Const("shift"), Const("mean"), Const("var"), name="bn", where=_inference)


def _factors(m: Match) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel multiplier s and offset t of the BN: BN(z) = z * s + t."""
    eps = m.node("bn").attrs["epsilon"]
    scale, shift, mean, var = (m.array(k).astype(np.float64) for k in ("scale", "shift", "mean", "var"))
    s = scale / np.sqrt(var + eps)
    return s, shift - mean * s


def _channels_first(m: Match) -> bool:
    return m.node("conv").attrs.get("layout", "NCHW") == "NCHW"  # the BN's channel axis is 1


def _conv_pattern(op: str) -> Op:
    return _bn(Op(op, Var("x"), Const("w"), Maybe(Const("b")), name="conv", where=_channels_first))


def _bias(m: Match, channels: int) -> np.ndarray:
    b = m.array("b")
    return np.zeros(channels) if b is None else b.astype(np.float64)


@rewrite_pass("fold_batchnorm_conv", _conv_pattern("Conv"))
def fold_into_conv(m: Match, emit: Emitter):
    """Conv -> BatchNormalization (inference) becomes one Conv with rescaled weights and bias."""
    w = m.array("w")
    s, t = _factors(m)
    w2 = w.astype(np.float64) * s.reshape((-1,) + (1,) * (w.ndim - 1))
    b2 = _bias(m, w.shape[0]) * s + t
    conv = m.node("conv")
    return emit.op("Conv", [m.value("x"), emit.const(w2, like=conv.inputs[1]), emit.const(b2, like=conv.inputs[1])], conv.attrs)


@rewrite_pass("fold_batchnorm_conv_transpose", _conv_pattern("ConvTranspose"))
def fold_into_conv_transpose(m: Match, emit: Emitter):
    """ConvTranspose -> BatchNormalization (inference): W is (C_in, C_out/groups, k...), so the
    per-output-channel factors scale its second axis within each group."""
    conv = m.node("conv")
    w = m.array("w").astype(np.float64)
    groups = conv.attrs["group"]
    c_in, per_group = w.shape[:2]
    s, t = _factors(m)
    grouped = w.reshape(groups, c_in // groups, per_group, *w.shape[2:])
    w2 = (grouped * s.reshape(groups, 1, per_group, *([1] * (w.ndim - 2)))).reshape(w.shape)
    b2 = _bias(m, groups * per_group) * s + t
    like = conv.inputs[1]
    return emit.op("ConvTranspose", [m.value("x"), emit.const(w2, like=like), emit.const(b2, like=like)], conv.attrs)


@rewrite_pass("fold_batchnorm_gemm", _conv_pattern("Gemm"))
def fold_into_gemm(m: Match, emit: Emitter):
    """Gemm -> BatchNormalization over its (N, M) output: columns of B and the bias rescaled."""
    gemm = m.node("conv")
    attrs = dict(gemm.attrs)
    w = m.array("w").astype(np.float64)
    s, t = _factors(m)
    w2 = w * (s.reshape(-1, 1) if attrs["transB"] else s.reshape(1, -1))
    c = m.array("b")
    bias = (np.zeros_like(s) if c is None else attrs["beta"] * c.astype(np.float64)) * s + t
    attrs["beta"] = 1.0
    like = gemm.inputs[1]
    bias = np.broadcast_to(bias, np.broadcast_shapes(bias.shape, s.shape)).copy()
    return emit.op("Gemm", [m.value("x"), emit.const(w2, like=like), emit.const(bias, like=like)], attrs)


FOLD_BATCHNORM = ["fold_batchnorm_conv", "fold_batchnorm_conv_transpose", "fold_batchnorm_gemm"]
