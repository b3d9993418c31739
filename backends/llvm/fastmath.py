"""float32 exp, tanh, log, log1p, expm1 and erf as plain arithmetic, so loops that use them vectorize.

LLVM lowers ``llvm.exp.f32``, ``llvm.log.f32`` and ``tanhf`` to a libm call per element: a fused
LSTM gate kernel spent ~9 ns per element on them, a Log 2.3 ns, an Elu (expm1f) 7.6 ns, an Erf 7.9 ns. These
versions are branch-free selects, multiply-adds and integer bit tricks (Cephes' expf and logf
polynomials; Eigen's rational tanh), within a few ulp of the correctly rounded result over the
whole float32 range, with NaN, infinities and subnormals handled as numpy does.
"""

from __future__ import annotations

import math

import llvmlite.ir as ir

F32 = ir.FloatType()
I32 = ir.IntType(32)
FAST = ("contract",)

LOG2E = 1.44269504088896341
LN2_HI, LN2_LO = 0.693359375, -2.12194440e-4  # ln 2 split so n * LN2_HI is exact
EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
EXP_HI, EXP_LO = 89.0, -104.0  # beyond these expf is inf or 0 in float32

TANH_CLAMP = 7.90531110763549805  # tanh rounds to +-1 in float32 from here on
TANH_TINY = 0.0004  # below this tanh(x) == x in float32
TANH_P = (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08, 1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03)
TANH_Q = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03)


def _f(value: float) -> ir.Constant:
    return ir.Constant(F32, value)


def _clamp(b: ir.IRBuilder, x: ir.Value, lo: float, hi: float) -> ir.Value:
    """x limited to [lo, hi]; NaN stays NaN (ordered compares are false for it)."""
    x = b.select(b.fcmp_ordered(">", x, _f(hi)), _f(hi), x)
    return b.select(b.fcmp_ordered("<", x, _f(lo)), _f(lo), x)


def _horner(b: ir.IRBuilder, x: ir.Value, coefficients: tuple[float, ...]) -> ir.Value:
    acc = _f(coefficients[0])
    for c in coefficients[1:]:
        acc = b.fadd(b.fmul(acc, x, flags=FAST), _f(c), flags=FAST)
    return acc


def _pow2(b: ir.IRBuilder, n: ir.Value) -> ir.Value:
    """2**n as a float for n in [-126, 127]: the exponent field set directly."""
    return b.bitcast(b.shl(b.add(n, ir.Constant(I32, 127)), ir.Constant(I32, 23)), F32)


def exp_f32(b: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """e**x: x = n ln2 + r with |r| <= ln2/2, e**r by polynomial, then scaled by 2**n in two
    halves so results down to the smallest subnormal and up to inf come out right."""
    module = b.module
    floor = module.declare_intrinsic("llvm.floor", [F32])
    xc = _clamp(b, x, EXP_LO, EXP_HI)
    nf = b.call(floor, [b.fadd(b.fmul(xc, _f(LOG2E)), _f(0.5))])
    r = b.fsub(b.fsub(xc, b.fmul(nf, _f(LN2_HI))), b.fmul(nf, _f(LN2_LO)))
    r2 = b.fmul(r, r)
    er = b.fadd(b.fadd(b.fmul(_horner(b, r, EXP_POLY), r2, flags=FAST), r), _f(1.0))
    n = b.fptosi(nf, I32)  # poison for NaN, which the last select discards
    half = b.ashr(n, ir.Constant(I32, 1))
    y = b.fmul(b.fmul(er, _pow2(b, half)), _pow2(b, b.sub(n, half)))
    return b.select(b.fcmp_unordered("uno", x, x), x, y)


def tanh_f32(b: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """tanh by Eigen's 13/6 rational approximation on [-7.9, 7.9] (+-1 beyond, x near 0)."""
    xc = _clamp(b, x, -TANH_CLAMP, TANH_CLAMP)
    x2 = b.fmul(xc, xc)
    ratio = b.fdiv(b.fmul(xc, _horner(b, x2, TANH_P)), _horner(b, x2, TANH_Q))
    fabs = b.module.declare_intrinsic("llvm.fabs", [F32])
    tiny = b.fcmp_ordered("<", b.call(fabs, [x]), _f(TANH_TINY))
    return b.select(tiny, x, ratio)


LOG_P = (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1, -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1)
SQRT_HALF = 0.707106781186547524
SMALLEST_NORMAL = 1.17549435e-38
EXPM1_TAYLOR = tuple(1.0 / math.factorial(n) for n in range(11, 1, -1))  # x**11/11! ... x**2/2!


def _i(value: int) -> ir.Constant:
    return ir.Constant(I32, value)


def _log_reduced(b: ir.IRBuilder, m: ir.Value, fe: ir.Value) -> ir.Value:
    """log(1 + m) + fe ln 2 for m in [sqrt(1/2) - 1, sqrt(2) - 1): Cephes' logf polynomial."""
    z = b.fmul(m, m)
    y = b.fmul(b.fmul(m, z), _horner(b, m, LOG_P), flags=FAST)
    y = b.fsub(b.fadd(y, b.fmul(fe, _f(LN2_LO))), b.fmul(z, _f(0.5)))
    return b.fadd(b.fadd(m, y), b.fmul(fe, _f(LN2_HI)))


def log_f32(b: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """log x: x = 2**e * (1 + m) with 1 + m in [sqrt(1/2), sqrt(2)), then ``_log_reduced``.
    Subnormals are scaled by 2**23 first; log 0 is -inf, log of a negative NaN, log inf inf."""
    subnormal = b.fcmp_ordered("<", x, _f(SMALLEST_NORMAL))
    bits = b.bitcast(b.select(subnormal, b.fmul(x, _f(2.0**23)), x), I32)
    e = b.sub(b.lshr(bits, _i(23)), b.select(subnormal, _i(126 + 23), _i(126)))  # x = 2**e * [0.5, 1)
    m = b.bitcast(b.or_(b.and_(bits, _i(0x007FFFFF)), _i(0x3F000000)), F32)
    low = b.fcmp_ordered("<", m, _f(SQRT_HALF))
    e = b.select(low, b.sub(e, _i(1)), e)
    m = b.fsub(b.select(low, b.fadd(m, m), m), _f(1.0))  # exact: Sterbenz
    r = _log_reduced(b, m, b.sitofp(e, F32))
    r = b.select(b.fcmp_ordered("==", x, _f(0.0)), _f(-math.inf), r)
    r = b.select(b.fcmp_ordered("<", x, _f(0.0)), _f(math.nan), r)
    r = b.select(b.fcmp_ordered("==", x, _f(math.inf)), x, r)
    return b.select(b.fcmp_unordered("uno", x, x), x, r)


def log1p_f32(b: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """log(1 + x): the polynomial on x itself where 1 + x is in [sqrt(1/2), sqrt(2)) (no
    rounding of 1 + x near 0), else log(u) * x / (u - 1) with u = 1 + x rounded: the division
    puts back what the rounding of u lost."""
    near = b.and_(b.fcmp_ordered(">=", x, _f(SQRT_HALF - 1.0)), b.fcmp_ordered("<", x, _f(math.sqrt(2.0) - 1.0)))
    u = b.fadd(x, _f(1.0))
    far = b.fmul(log_f32(b, u), b.fdiv(x, b.fsub(u, _f(1.0))))
    far = b.select(b.fcmp_ordered("==", x, _f(math.inf)), x, far)
    return b.select(near, _log_reduced(b, x, _f(0.0)), far)


def expm1_f32(b: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """e**x - 1: Taylor's series to x**11 for |x| < 1 (no cancellation near 0), exp(x) - 1
    beyond (at most 1.6 times exp's error there)."""
    fabs = b.module.declare_intrinsic("llvm.fabs", [F32])
    small = b.fcmp_ordered("<", b.call(fabs, [x]), _f(1.0))
    series = b.fadd(x, b.fmul(b.fmul(x, x), _horner(b, x, EXPM1_TAYLOR), flags=FAST), flags=FAST)
    return b.select(small, series, b.fsub(exp_f32(b, x), _f(1.0)))


# erf(x) = x + x R(x**2) for |x| < 1 and 1 - exp(-x**2) Q(1/|x|) up to ERF_ONE (where float32's
# erf reaches 1): least-squares fits made for kiln (numpy, Chebyshev nodes), each within 1 ulp
# in float32 arithmetic
ERF_R = (7.933493907e-05, -8.034846396e-04, 5.191218574e-03, -2.685539983e-02, 1.128362566e-01, -3.761262894e-01, 1.283791661e-01)
ERFC_Q = (-1.100864541e-02, 3.607938811e-02, 8.337129839e-03, -2.244656533e-01, 4.850532115e-01, -4.666184485e-01, 4.072100669e-02, 5.592264533e-01, 2.591138764e-04)
ERF_ONE = 3.92


def erf_f32(b: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """erf x: near 0, x plus a small correction (so x's own bits carry the result); beyond 1,
    one minus the tail, erfc(a) = exp(-a**2) Q(1/a) with a = |x| (clamped at ERF_ONE, where
    the tail rounds away), signed like x."""
    fabs = b.module.declare_intrinsic("llvm.fabs", [F32])
    copysign = b.module.declare_intrinsic("llvm.copysign", [F32], ir.FunctionType(F32, [F32, F32]))
    a = b.call(fabs, [x])
    near = b.fadd(x, b.fmul(x, _horner(b, b.fmul(x, x), ERF_R), flags=FAST), flags=FAST)
    a = b.select(b.fcmp_ordered(">", a, _f(ERF_ONE)), _f(ERF_ONE), a)
    tail = b.fmul(exp_f32(b, b.fneg(b.fmul(a, a))), _horner(b, b.fdiv(_f(1.0), a), ERFC_Q))
    far = b.call(copysign, [b.fsub(_f(1.0), tail), x])
    result = b.select(b.fcmp_ordered("<", b.call(fabs, [x]), _f(1.0)), near, far)
    return b.select(b.fcmp_unordered("uno", x, x), x, result)


# what LLVMScalarOps.call emits inline for float32 (other dtypes and functions call libm), and
# what each costs an element beyond a plain pass over it (a Relu), measured on 65536 float32s
INLINE_F32 = {"exp": exp_f32, "tanh": tanh_f32, "log": log_f32, "log1p": log1p_f32, "expm1": expm1_f32, "erf": erf_f32}
INLINE_F32_COST = {"exp": 2.5, "tanh": 1.5, "log": 3.0, "log1p": 8.0, "expm1": 4.0, "erf": 6.0}
LIBM_CALL_COST = 40.0  # a scalar call per element: Pow 55, Sin 42 plain passes
