"""Signal processing: the discrete Fourier transform along one axis, with static lengths.

A signal is real (last axis of size 1) or complex (last axis of size 2: real, imaginary).
``DFT`` follows ONNX's (opsets 17 and 20): ``length`` is the transform length (the signal is
cut or zero-padded to it), ``onesided`` keeps the first ``length // 2 + 1`` bins of a forward
transform, and an inverse one-sided transform is numpy's ``irfft``: one-sided bins in, a real
signal of ``length`` out. ``dft_matrix`` is the transform as one real matrix, which is how
the compiled targets compute it (``passes/decompose.py``)."""

from __future__ import annotations

import numpy as np

from kiln.ir.opdef import REQUIRED, OpDef, OpKind, register
from kiln.ir.dtypes import FLOATS
from kiln.ir.ops.rules import check_dtype, fail, present


def dft_output_shape(shape, axis: int, length: int, inverse: bool, onesided: bool) -> list[int]:
    out = list(shape)
    if inverse and onesided:  # irfft: a real signal
        out[axis], out[-1] = length, 1
    else:
        out[axis], out[-1] = (length // 2 + 1 if onesided else length), 2
    return out


def _dft_infer(attrs, types):
    x = present(types, 0, "input")
    check_dtype(x, FLOATS, "input")
    if x.rank < 2 or x.shape[-1] not in (1, 2):
        raise fail(f"input {x} must end in an axis of 1 (real) or 2 (complex) values")
    axis = attrs["axis"]
    if not -x.rank <= axis < x.rank or axis % x.rank == x.rank - 1:
        raise fail(f"axis {axis} must name a signal axis of {x} (not the last, which holds the real and imaginary parts)")
    if attrs["length"] < 1:
        raise fail(f"the transform length must be positive, got {attrs['length']}")
    if attrs["onesided"] and x.shape[-1] != (2 if attrs["inverse"] else 1):
        kind = "an inverse one-sided DFT takes complex bins" if attrs["inverse"] else "a one-sided DFT takes a real signal"
        raise fail(f"{kind}, not {x}")
    return [x.with_shape(dft_output_shape(x.shape, axis % x.rank, attrs["length"], attrs["inverse"], attrs["onesided"]))]


def _complex(x: np.ndarray) -> np.ndarray:
    """The signal as complex numbers of the input's precision (numpy's FFT keeps complex64
    single precision, as ONNX's reference does: its expected outputs carry that rounding)."""
    kind = np.complex128 if x.dtype == np.float64 else np.complex64
    return (x[..., 0] if x.shape[-1] == 1 else x[..., 0] + 1j * x[..., 1]).astype(kind)


def _dft(attrs, x):
    axis, n = attrs["axis"] % x.ndim, attrs["length"]
    signal = _complex(x)
    if attrs["inverse"] and attrs["onesided"]:
        return np.asarray(np.fft.irfft(signal, n=n, axis=axis)[..., None], dtype=x.dtype)
    result = np.fft.ifft(signal, n=n, axis=axis) if attrs["inverse"] else np.fft.fft(signal, n=n, axis=axis)
    if attrs["onesided"]:
        result = np.take(result, np.arange(n // 2 + 1), axis=axis)
    return np.stack([result.real, result.imag], axis=-1).astype(x.dtype)


register(OpDef("DFT", OpKind.HEAVY, _dft_infer, _dft, {"axis": REQUIRED, "length": REQUIRED, "inverse": 0, "onesided": 0}))


def dft_matrix(size: int, parts: int, length: int, inverse: bool, onesided: bool) -> np.ndarray:
    """The transform of a signal of ``size`` samples with ``parts`` values each (1 real, 2
    complex) as a real (parts * size, out_parts * bins) float64 matrix: the signal laid out
    part-major (its real samples, then its imaginary ones) times the matrix is the result laid
    out the same way. Samples past ``length`` are cut (their rows are zero); fewer samples are
    the zero padding."""
    n = np.arange(size)[:, None]
    if inverse and onesided:  # irfft: bins 0..length//2 in, DC and Nyquist once, the rest twice
        used = n < length // 2 + 1
        weight = np.where((n == 0) | ((length % 2 == 0) & (n == length // 2)), 1.0, 2.0)
        angle = 2 * np.pi * n * np.arange(length)[None, :] / length
        real = np.where(used, weight * np.cos(angle), 0.0) / length
        imaginary = np.where(used, -weight * np.sin(angle), 0.0) / length
        return np.concatenate([real, imaginary])
    bins = length // 2 + 1 if onesided else length
    angle = 2 * np.pi * n * np.arange(bins)[None, :] / length
    inside = n < length  # samples past the transform length are cut
    cos, sin = np.where(inside, np.cos(angle), 0.0), np.where(inside, np.sin(angle), 0.0)
    sign = 1.0 if inverse else -1.0  # e^(sign * i * angle)
    scale = 1.0 / length if inverse else 1.0
    # (xr + i xi)(cos + i sign sin) = xr cos - sign xi sin + i (xi cos + sign xr sin)
    top = np.concatenate([cos, sign * sin], axis=1)  # the real samples' rows: (real, imaginary) out
    if parts == 1:
        return top * scale
    bottom = np.concatenate([-sign * sin, cos], axis=1)
    return np.concatenate([top, bottom]) * scale
