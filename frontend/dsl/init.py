"""Parameter initializers, drawn from one seeded generator so models are reproducible.

``kiln.nn.init.seed(0)`` resets the generator; every layer draws its initial weights from it
in construction order, so the same seed and the same model code give the same weights.
Fan-in/fan-out follow PyTorch's conventions: (out, in, *kernel) weights.
"""

from __future__ import annotations

import math

import numpy as np

_generator = np.random.default_rng(0)


def seed(value: int) -> None:
    """Reset the generator every initializer draws from."""
    global _generator
    _generator = np.random.default_rng(value)


def generator() -> np.random.Generator:
    return _generator


def _fans(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) < 2:
        raise ValueError(f"fan-in/fan-out need a weight of rank >= 2, got shape {shape}")
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def zeros(shape, dtype=np.float32) -> np.ndarray:
    return np.zeros(shape, dtype)


def ones(shape, dtype=np.float32) -> np.ndarray:
    return np.ones(shape, dtype)


def normal(shape, mean: float = 0.0, std: float = 1.0, dtype=np.float32) -> np.ndarray:
    return _generator.normal(mean, std, shape).astype(dtype)


def uniform(shape, low: float = -1.0, high: float = 1.0, dtype=np.float32) -> np.ndarray:
    return _generator.uniform(low, high, shape).astype(dtype)


def xavier_uniform(shape, gain: float = 1.0, dtype=np.float32) -> np.ndarray:
    """Glorot: U(-a, a) with a = gain * sqrt(6 / (fan_in + fan_out))."""
    fan_in, fan_out = _fans(tuple(shape))
    a = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return uniform(shape, -a, a, dtype)


def xavier_normal(shape, gain: float = 1.0, dtype=np.float32) -> np.ndarray:
    fan_in, fan_out = _fans(tuple(shape))
    return normal(shape, 0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)), dtype)


def kaiming_uniform(shape, a: float = 0.0, mode: str = "fan_in", dtype=np.float32) -> np.ndarray:
    """He: U(-b, b) with b = gain * sqrt(3 / fan), gain = sqrt(2 / (1 + a^2)) (leaky-ReLU slope a)."""
    fan_in, fan_out = _fans(tuple(shape))
    fan = fan_in if mode == "fan_in" else fan_out
    bound = math.sqrt(2.0 / (1 + a * a)) * math.sqrt(3.0 / fan)
    return uniform(shape, -bound, bound, dtype)


def kaiming_normal(shape, a: float = 0.0, mode: str = "fan_out", dtype=np.float32) -> np.ndarray:
    fan_in, fan_out = _fans(tuple(shape))
    fan = fan_in if mode == "fan_in" else fan_out
    return normal(shape, 0.0, math.sqrt(2.0 / (1 + a * a)) / math.sqrt(fan), dtype)


def orthogonal(shape, gain: float = 1.0, dtype=np.float32) -> np.ndarray:
    """A (semi-)orthogonal matrix over the first axis against the rest (Saxe et al.)."""
    rows = shape[0]
    cols = math.prod(shape[1:])
    flat = _generator.normal(0.0, 1.0, (max(rows, cols), min(rows, cols)))
    q, r = np.linalg.qr(flat)
    q *= np.sign(np.diag(r))
    if rows < cols:
        q = q.T
    return (gain * q[:rows, :cols]).reshape(shape).astype(dtype)
