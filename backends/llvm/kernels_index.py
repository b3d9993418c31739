"""Index-driven kernels: gathers, scatters, one-hot, sequence reversal and top-k. Every index
read at run time is wrapped (negative counts from the end) and clamped into its dim, so a bad
index reads or writes a valid element, never memory the kernel does not own."""

from __future__ import annotations

from typing import Callable

import llvmlite.ir as ir

from kiln.backends.llvm.codegen import KernelContext, kernel
from kiln.backends.llvm.emit import I64, LLVMScalarOps, View, const_i64, entry_alloca, for_range, loop_nest
from kiln.backends.llvm.kernels_data import copy
from kiln.errors import KilnError
from kiln.ir.dtypes import DType


def _wrap_index(b: ir.IRBuilder, i: ir.Value, dim: int) -> ir.Value:
    """A possibly negative index into a dim of ``dim``, wrapped and clamped into range (an
    out-of-range index reads a valid element rather than memory the kernel does not own)."""
    i = b.sext(i, I64) if i.type != I64 else i
    i = b.select(b.icmp_signed("<", i, const_i64(0)), b.add(i, const_i64(dim)), i)
    i = b.select(b.icmp_signed("<", i, const_i64(0)), const_i64(0), i)
    return b.select(b.icmp_signed(">=", i, const_i64(dim)), const_i64(dim - 1), i)


@kernel("Gather")
def gather(ctx: KernelContext) -> None:
    data, idx = ctx.inputs
    out = ctx.outputs[0]
    axis = ctx.node.attrs["axis"] % len(data.shape)
    b = ctx.b
    dim = data.shape[axis]
    with loop_nest(b, out.shape) as index:
        before, picked, after = index[:axis], index[axis : axis + len(idx.shape)], index[axis + len(idx.shape) :]
        i = _wrap_index(b, idx.load(b, picked), dim)
        out.store(b, index, data.load(b, [*before, i, *after]))


@kernel("GatherElements")
def gather_elements(ctx: KernelContext) -> None:
    data, idx = ctx.inputs
    out = ctx.outputs[0]
    axis = ctx.node.attrs["axis"] % len(data.shape)
    b = ctx.b
    with loop_nest(b, out.shape) as index:
        source = list(index)
        source[axis] = _wrap_index(b, idx.load(b, index), data.shape[axis])
        out.store(b, index, data.load(b, source))


@kernel("OneHot")
def one_hot(ctx: KernelContext) -> None:
    """out[..., j, ...] = values[1] where the index (wrapped) is j along ``axis``, else values[0]."""
    idx, values = ctx.inputs
    out = ctx.outputs[0]
    axis = ctx.node.attrs["axis"] % len(out.shape)
    depth = int(ctx.node.attrs["depth"])
    b = ctx.b
    E = LLVMScalarOps(b, ctx.module)
    off = E.typed(values.load(b, [const_i64(0)]), values.dtype)
    on = E.typed(values.load(b, [const_i64(1)]), values.dtype)
    with loop_nest(b, out.shape) as index:
        raw = E.typed(idx.load(b, [*index[:axis], *index[axis + 1 :]]), idx.dtype)
        i = E.cast(raw, DType.int64) if idx.dtype is not DType.int64 else raw
        i = b.select(b.icmp_signed("<", i, const_i64(0)), b.add(i, const_i64(depth)), i)
        out.store(b, index, b.select(b.icmp_signed("==", i, index[axis]), on, off))


@kernel("ScatterND")
def scatter_nd(ctx: KernelContext) -> None:
    """A copy of data, then each update row in order: written (``none``, the last duplicate
    wins as in the reference) or combined (add, mul, max, min) into the row the index names."""
    data, idx, upd = ctx.inputs
    out = ctx.outputs[0]
    copy(ctx, out, data)
    b = ctx.b
    E = LLVMScalarOps(b, ctx.module)
    combine = _combiner(ctx, E)
    k = idx.shape[-1]
    with loop_nest(b, idx.shape[:-1], name="u") as row:
        target = [_wrap_index(b, idx.load(b, [*row, const_i64(j)]), data.shape[j]) for j in range(k)]
        with loop_nest(b, data.shape[k:], name="e") as element:
            _scatter_one(b, E, out, [*target, *element], E.typed(upd.load(b, [*row, *element]), upd.dtype), combine)


@kernel("GatherND")
def gather_nd(ctx: KernelContext) -> None:
    """out[b..., r..., t...] = data[b..., idx[b..., r..., :], t...] (``batch_dims`` leading b)."""
    data, idx = ctx.inputs
    out = ctx.outputs[0]
    batch = ctx.node.attrs["batch_dims"]
    k = idx.shape[-1]
    rows = len(idx.shape) - 1
    b = ctx.b
    with loop_nest(b, out.shape) as index:
        row = index[:rows]
        picked = [_wrap_index(b, idx.load(b, [*row, const_i64(j)]), data.shape[batch + j]) for j in range(k)]
        out.store(b, index, data.load(b, [*index[:batch], *picked, *index[rows:]]))


def _combiner(ctx: KernelContext, E: LLVMScalarOps) -> Callable | None:
    """How a scatter folds an update into the element it lands on (None: overwrite)."""
    reduction = ctx.node.attrs["reduction"]
    if reduction == "none":
        return None
    combine = {"add": E.add, "mul": E.mul, "max": E.max, "min": E.min}.get(reduction)
    if combine is None:
        raise KilnError(f"node {ctx.node.name!r}: {ctx.node.op.name} reduction {reduction!r} has no LLVM kernel yet")
    return combine


def _scatter_one(b: ir.IRBuilder, E: LLVMScalarOps, out: View, where: list, value: ir.Value, combine: Callable | None) -> None:
    if combine is not None:
        value = combine(E.typed(out.load(b, where), out.dtype), value)
    out.store(b, where, value)


@kernel("ScatterElements")
def scatter_elements(ctx: KernelContext) -> None:
    """A copy of data, then each update in order, at its own position with the index replacing
    the coordinate along ``axis`` (the last duplicate wins, or all combine)."""
    data, idx, upd = ctx.inputs
    out = ctx.outputs[0]
    axis = ctx.node.attrs["axis"] % len(data.shape)
    copy(ctx, out, data)
    b = ctx.b
    E = LLVMScalarOps(b, ctx.module)
    combine = _combiner(ctx, E)
    with loop_nest(b, idx.shape) as index:
        where = list(index)
        where[axis] = _wrap_index(b, idx.load(b, index), data.shape[axis])
        _scatter_one(b, E, out, where, E.typed(upd.load(b, index), upd.dtype), combine)


@kernel("ReverseSequence")
def reverse_sequence(ctx: KernelContext) -> None:
    """Along ``time_axis``, the first lens[b] steps of batch row b reversed, the rest copied."""
    x, lens = ctx.inputs
    out = ctx.outputs[0]
    rank = len(x.shape)
    batch, time = ctx.node.attrs["batch_axis"] % rank, ctx.node.attrs["time_axis"] % rank
    steps = x.shape[time]
    b = ctx.b
    with loop_nest(b, out.shape) as index:
        n = lens.load(b, [index[batch]])
        n = b.sext(n, I64) if n.type != I64 else n
        n = b.select(b.icmp_signed(">", n, const_i64(steps)), const_i64(steps), n)  # lens past the end mean all
        t = index[time]
        source = list(index)
        source[time] = b.select(b.icmp_signed("<", t, n), b.sub(b.sub(n, const_i64(1)), t), t)
        out.store(b, index, x.load(b, source))


def _sorts_before(E: LLVMScalarOps, largest: bool) -> Callable[[ir.Value, ir.Value], ir.Value]:
    """``before(a, b)``: whether value a sorts strictly ahead of b; NaN sorts last both ways,
    as numpy's argsort puts it."""

    def before(a, b):
        ahead = E.gt(a, b) if largest else E.lt(a, b)
        if not E.dtype(a).is_float:
            return ahead
        return E.logical_or(ahead, E.logical_and(E.isnan(b), E.logical_not(E.isnan(a))))

    return before


@kernel("TopK")
def top_k(ctx: KernelContext) -> None:
    """Per line along ``axis``, insertion into the k output slots, kept sorted: an element
    enters when it sorts ahead of the k-th and moves up past every slot it sorts strictly
    ahead of, so ties keep the lower index first (a stable sort, as ONNX asks)."""
    node = ctx.node
    x = ctx.inputs[0]
    values = ctx.outputs[0]
    indices = ctx.outputs[1] if len(ctx.outputs) > 1 else None
    rank = len(x.shape)
    axis = node.attrs["axis"] % rank
    n, k = x.shape[axis], node.attrs["k"]
    if k == 0:
        return
    b = ctx.b
    E = LLVMScalarOps(b, ctx.module)
    before = _sorts_before(E, bool(node.attrs["largest"]))
    filled = entry_alloca(b, I64)
    outer = [d for i, d in enumerate(x.shape) if i != axis]

    def at(line, slot):
        return [*line[:axis], slot, *line[axis:]]

    with loop_nest(b, outer, name="line") as line:
        b.store(const_i64(0), filled)
        with for_range(b, n, name="elem") as i:
            value = E.typed(x.load(b, at(line, i)), x.dtype)
            count = b.load(filled, typ=I64)
            full = b.icmp_signed("==", count, const_i64(k))
            last = E.typed(values.load(b, at(line, const_i64(k - 1))), values.dtype)
            enters = b.or_(b.not_(full), before(value, last))
            with b.if_then(enters):
                b.store(b.select(full, count, b.add(count, const_i64(1))), filled)
                start = b.select(full, const_i64(k - 1), count)
                slot = _move_up(b, E, values, indices, line, at, start, value, before)
                values.store(b, at(line, slot), value)
                if indices is not None:
                    indices.store(b, at(line, slot), i)


def _move_up(b, E, values, indices, line, at, start, value, before) -> ir.Value:
    """Shift slots down from ``start`` while ``value`` sorts ahead of the one above; the slot
    it stops at."""
    entry = b.block
    cond = b.append_basic_block("shift.cond")
    body = b.append_basic_block("shift.body")
    done = b.append_basic_block("shift.done")
    b.branch(cond)
    b.position_at_end(cond)
    slot = b.phi(I64, name="slot")
    slot.add_incoming(start, entry)
    positive = b.icmp_signed(">", slot, const_i64(0))
    above = b.select(positive, b.sub(slot, const_i64(1)), const_i64(0))  # never reads slot -1
    above_value = E.typed(values.load(b, at(line, above)), values.dtype)
    b.cbranch(b.and_(positive, before(value, above_value)), body, done)
    b.position_at_end(body)
    values.store(b, at(line, slot), above_value)
    if indices is not None:
        indices.store(b, at(line, slot), indices.load(b, at(line, above)))
    slot.add_incoming(above, body)
    b.branch(cond)
    b.position_at_end(done)
    return slot
