"""Small linear-algebra kernels: Einsum as one loop nest over its labels, Det by LU
factorization with partial pivoting."""

from __future__ import annotations

from kiln.backends.llvm.codegen import KernelContext, kernel
from kiln.backends.llvm.emit import I64, LLVMScalarOps, View, const_i64, entry_alloca, for_range, llvm_type, loop_nest
from kiln.ir.dtypes import DType
from kiln.ir.ops.linalg import einsum_labels


@kernel("Einsum")
def einsum(ctx: KernelContext) -> None:
    """out[o...] = sum over the other labels of the product of the operands. Each operand is a
    view indexed by (output labels, summed labels): a label it repeats sums its strides (a
    diagonal), a label it lacks or broadcasts has stride 0. Floats accumulate in float64."""
    out = ctx.outputs[0]
    operands = ctx.inputs
    labels, out_labels = einsum_labels(ctx.node.attrs["equation"], [len(v.shape) for v in operands])
    sizes: dict[str, int] = {}
    for dims, view in zip(labels, operands):
        for label, d in zip(dims, view.shape):
            sizes[label] = max(sizes.get(label, 1), d)
    summed = [label for label in dict.fromkeys(label for dims in labels for label in dims) if label not in out_labels]
    order = [*out_labels, *summed]
    views = []
    for dims, view in zip(labels, operands):
        strides = dict.fromkeys(order, 0)
        for label, d, s in zip(dims, view.shape, view.strides):
            if d == sizes[label]:
                strides[label] += s
        views.append(View(view.ptr, view.dtype, tuple(sizes[k] for k in order), tuple(strides[k] for k in order), view.offset))
    b = ctx.b
    E = LLVMScalarOps(b, ctx.module)
    work = DType.float64 if out.dtype.is_float else out.dtype
    acc = entry_alloca(b, llvm_type(work))
    with loop_nest(b, out.shape, name="o") as index:
        b.store(E.constant(0, work), acc)
        with loop_nest(b, [sizes[k] for k in summed], name="s") as rest:
            term = None
            for view in views:
                value = E.cast(E.typed(view.load(b, [*index, *rest]), view.dtype), work)
                term = value if term is None else E.mul(term, value)
            b.store(E.add(E.typed(b.load(acc, typ=llvm_type(work)), work), term), acc)
        out.store(b, index, E.cast(E.typed(b.load(acc, typ=llvm_type(work)), work), out.dtype))


def _det_scratch(node) -> int:
    n = node.inputs[0].type.shape[-1]
    return 8 * n * n


@kernel("Det", scratch=_det_scratch)
def det(ctx: KernelContext) -> None:
    """Per matrix, in float64 scratch: Gaussian elimination with partial pivoting; the
    determinant is the product of the pivots, negated for each row swap. A zero pivot column
    leaves the product 0 and is not divided by."""
    x, out = ctx.inputs[0], ctx.outputs[0]
    n = x.shape[-1]
    batch = x.shape[:-2]
    b = ctx.b
    E = LLVMScalarOps(b, ctx.module)
    f64 = DType.float64
    a = View.dense(ctx.scratch, f64, (n, n))
    product, pivot_row, best = entry_alloca(b, llvm_type(f64)), entry_alloca(b, I64), entry_alloca(b, llvm_type(f64))

    def at(i, j):
        return E.typed(a.load(b, [i, j]), f64)

    with loop_nest(b, batch, name="m") as index:
        with loop_nest(b, (n, n), name="c") as ij:
            a.store(b, ij, E.cast(E.typed(x.load(b, [*index, *ij]), x.dtype), f64))
        b.store(E.constant(1, f64), product)
        with for_range(b, n, name="k") as k:
            b.store(k, pivot_row)
            b.store(E.call("fabs", at(k, k)), best)
            with for_range(b, n, start=b.add(k, const_i64(1)), name="p") as i:
                size = E.call("fabs", at(i, k))
                with b.if_then(E.gt(size, E.typed(b.load(best, typ=llvm_type(f64)), f64))):
                    b.store(size, best)
                    b.store(i, pivot_row)
            p = b.load(pivot_row, typ=I64)
            with b.if_then(b.icmp_signed("!=", p, k)):
                with for_range(b, n, name="sw") as j:
                    upper, lower = at(k, j), at(p, j)
                    a.store(b, [k, j], lower)
                    a.store(b, [p, j], upper)
                b.store(E.neg(E.typed(b.load(product, typ=llvm_type(f64)), f64)), product)
            pivot = at(k, k)
            b.store(E.mul(E.typed(b.load(product, typ=llvm_type(f64)), f64), pivot), product)
            singular = E.eq(pivot, E.constant(0, f64))
            with for_range(b, n, start=b.add(k, const_i64(1)), name="r") as i:
                factor = E.select(singular, E.constant(0, f64), E.div(at(i, k), pivot))
                with for_range(b, n, start=b.add(k, const_i64(1)), name="e") as j:
                    a.store(b, [i, j], E.sub(at(i, j), E.mul(factor, at(k, j))))
        out.store(b, index, E.cast(E.typed(b.load(product, typ=llvm_type(f64)), f64), out.dtype))

