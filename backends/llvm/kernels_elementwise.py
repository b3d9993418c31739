"""Elementwise kernels: any op with a scalar ``compute`` rule, fused elementwise groups as one
loop nest, fused groups of other kinds as a sub-program, and inference BatchNormalization."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import llvmlite.ir as ir

from kiln.backends.llvm import kernels_reduce_fused
from kiln.backends.llvm.codegen import KernelContext, kernel, panel_spec, program_bytes, scratch_bytes
from kiln.backends.llvm.emit import PTR, LLVMScalarOps, Panels, View, loop_nest
from kiln.backends.llvm.fastmath import INLINE_F32, INLINE_F32_COST, LIBM_CALL_COST
from kiln.backends.llvm.parallel import Emitting, parallel_rows
from kiln.config import num_threads
from kiln.errors import KilnError
from kiln.ir.dtypes import DType
from kiln.ir.opdef import OpKind
from kiln.passes.plan_memory import plan_memory


PARALLEL_WORK = 1 << 15  # a loop over less (elements x work per element) runs faster on one core


def coalesce(shape: Sequence[int], views: Sequence[View]) -> tuple[list[int], list[View]]:
    """Drop unit dims and merge adjacent dims that every view walks contiguously, so the loop
    nest is shallow and its innermost loop long (what the vectorizer wants)."""
    dims = [(d, [v.strides[i] for v in views]) for i, d in enumerate(shape) if d != 1]
    merged: list[tuple[int, list[int]]] = []
    for d, strides in dims:
        if merged and all(outer == inner * d for outer, inner in zip(merged[-1][1], strides)):
            merged[-1] = (merged[-1][0] * d, strides)
        else:
            merged.append((d, strides))
    if not merged:
        merged = [(1, [0] * len(views))]
    shape_out = [d for d, _ in merged]
    return shape_out, [
        View(v.ptr, v.dtype, tuple(shape_out), tuple(ss[k] for _, ss in merged), v.offset) for k, v in enumerate(views)
    ]


def emit_pointwise(
    b: ir.IRBuilder,
    module: ir.Module,
    out: View,
    inputs: Sequence[View | None],
    body: Callable[[LLVMScalarOps, list], ir.Value],
) -> None:
    """``out[i] = body(E, [inp[i] ...])`` over every index of ``out`` (inputs broadcast)."""
    emit_pointwise_outputs(b, module, [out], inputs, lambda E, xs: [body(E, xs)])


def emit_pointwise_outputs(
    b: ir.IRBuilder,
    module: ir.Module,
    outs: Sequence[View],
    inputs: Sequence[View | None],
    body: Callable[[LLVMScalarOps, list], list],
    parallel: bool = True,
    work: float = 1.0,
) -> None:
    """``outs[k][i] = body(E, [inp[i] ...])[k]``: one loop nest writing several outputs of one
    shape (an elementwise group that fans out); split over the pool when the elements times
    ``work`` (what one costs, in plain passes: ``element_work``) is large, unless ``parallel`` is
    False (code already running as one block of a split kernel)."""
    shape0 = outs[0].shape
    present = [v.broadcast_to(shape0) for v in inputs if v is not None]
    shape, coalesced = coalesce(shape0, [*outs, *present])
    out_views, in_views = coalesced[: len(outs)], iter(coalesced[len(outs) :])
    views = [next(in_views) if v is not None else None for v in inputs]
    # split once the loop's work reaches PARALLEL_WORK, in blocks of at least half of it (a Relu
    # over 32768 floats: 3.2 -> 2.7 us on two threads; an LSTM cell's 4096: 13 -> 7 us)
    threads = min(num_threads(), int(2 * math.prod(shape) * work) // PARALLEL_WORK) if parallel else 1
    if threads < 2:
        _pointwise_loop(Emitting(b, module), shape, out_views, views, body)
        return
    present_views = [*out_views, *(v for v in views if v is not None)]
    # each buffer passed once: an output updated in place stays one pointer in the blocks, else
    # the vectorizer's overlap check fails at run time and the loop runs scalar (a GEMM's GELU
    # tail: 0.31 -> 2.75 ms)
    pointers = list(dict.fromkeys(v.ptr for v in present_views))

    def block(emitting, ptrs, lo, hi, _):
        passed = dict(zip(pointers, ptrs))
        moved = iter(v.rows(lo, hi, passed[v.ptr]) for v in present_views)
        part = [next(moved) for _ in out_views], [next(moved) if v is not None else None for v in views]
        _pointwise_loop(emitting, [hi - lo, *shape[1:]], *part, body)

    align = max(1, 64 // outs[0].dtype.itemsize) if len(shape) == 1 else 1  # blocks on cache lines
    parallel_rows(Emitting(b, module), shape[0], threads, pointers, block, align)


def _pointwise_loop(emitting, shape, out_views: Sequence[View], views: Sequence[View | None], body) -> None:
    b = emitting.b
    E = LLVMScalarOps(b, emitting.module)
    with loop_nest(b, shape) as index:
        loaded = [E.typed(v.load(b, index), v.dtype) if v is not None else None for v in views]
        for view, value in zip(out_views, body(E, loaded)):
            view.store(b, index, value)


@kernel("<elementwise>")
def elementwise(ctx: KernelContext) -> None:
    node = ctx.node
    body = lambda E, xs: [node.op.compute(E, node.attrs, *xs)]
    emit_pointwise_outputs(ctx.b, ctx.module, ctx.outputs, ctx.inputs, body, work=element_work([node], [v for v in node.inputs if v is not None]))


def _fused_scratch(node) -> int:
    body = node.attrs["body"]
    if _is_pointwise(body) or kernels_reduce_fused.applies(body):
        return 0
    if _heavy_then_pointwise(body) is not None:
        return scratch_bytes(body.nodes[0])
    return program_bytes(body, plan_memory(body))


def is_pointwise(node) -> bool:
    """Whether ``node``'s kernel reads and writes each element at one index in one loop (an
    elementwise op with a compute rule, or a pointwise Fused group)."""
    if node.op.name == "Fused":
        return _is_pointwise(node.attrs["body"])
    return node.op.kind is OpKind.ELEMENTWISE and node.op.compute is not None


def _is_pointwise(body) -> bool:
    """One loop nest can compute the group: elementwise ops only, every output of one shape."""
    shapes = {v.type.shape for v in body.outputs}
    produced = {id(v) for n in body.nodes for v in n.outputs}
    return (
        len(shapes) == 1
        and all(id(v) in produced for v in body.outputs)
        and all(n.op.kind is OpKind.ELEMENTWISE and n.op.compute is not None for n in body.nodes)
    )


@kernel("Fused", scratch=_fused_scratch)
def fused(ctx: KernelContext) -> None:
    body = ctx.node.attrs["body"]
    if _is_pointwise(body):
        _fused_pointwise(ctx, body)
        return
    from kiln.backends.llvm.kernels_conv import fused_conv

    if fused_conv(ctx, body):  # a conv and its pointwise tail: the tail applied per block of output
        return
    if kernels_reduce_fused.applies(body):  # elementwise ops summed as they are computed
        kernels_reduce_fused.emit(ctx, body)
        return
    operands = _heavy_then_pointwise(body)
    if operands is not None:  # a GEMM's bias and GELU: one pass over its output, in place
        _emit_heavy_then_pointwise(ctx, body, operands)
        return
    # a group around a heavy op or a reduction: its body runs as a sub-program whose
    # intermediates live in scratch; its inputs and outputs are the Fused node's own buffers
    plan = plan_memory(body)
    outer = {id(v): view.ptr for v, view in zip(body.inputs, ctx.inputs)}
    outer.update({id(v): view.ptr for v, view in zip(body.outputs, ctx.outputs)})
    for buf in plan.buffers:
        buf.values = [v for v in buf.values if id(v) not in outer]
    panels = {id(v) for v, view in zip(body.inputs, ctx.inputs) if isinstance(view, Panels)}

    def packed(node, i):  # the group's packed inputs reach the body nodes that take them so
        v = node.inputs[i]
        return outer[id(v)] if v is not None and id(v) in panels and panel_spec(node, i) is not None else None

    ctx.codegen.emit_program(body, plan, ctx.b, lambda v: outer[id(v)], ctx.scratch, packed=packed)


def _heavy_then_pointwise(body) -> list | None:
    """The body inputs the tail reads where ``body`` is one heavy op (a GEMM, a conv no
    fused kernel took) and elementwise ops on values of its output's shape and dtype, ending
    in the group's one output; else None. The op then writes the group's output, and one loop
    applies the whole tail to it in place, where the sub-program made a pass per op (ViT's
    GELU after its MLP's GEMM: five)."""
    heavy, *chain = body.nodes
    if heavy.op.kind is not OpKind.HEAVY or len(heavy.outputs) != 1 or not chain or len(body.outputs) != 1:
        return None
    out = heavy.outputs[0].type
    if body.outputs[0] is not chain[-1].outputs[0] or body.outputs[0].type.dtype != out.dtype:
        return None
    if not all(n.op.kind is OpKind.ELEMENTWISE and n.op.compute is not None and len(n.outputs) == 1 and n.outputs[0].type.shape == out.shape for n in chain):
        return None
    inside = {id(v) for n in body.nodes for v in n.outputs}
    return list(dict.fromkeys(v for n in chain for v in n.inputs if v is not None and id(v) not in inside))


def _emit_heavy_then_pointwise(ctx: KernelContext, body, operands: list) -> None:
    heavy, *chain = body.nodes
    outer = {id(v): view for v, view in zip(body.inputs, ctx.inputs)}
    panels = frozenset(i for i, v in enumerate(heavy.inputs) if v is not None and isinstance(outer[id(v)], Panels) and panel_spec(heavy, i) is not None)
    fn = ctx.codegen.kernel_function(heavy, panels, tuple(None for _ in heavy.inputs))
    args = [outer[id(v)].ptr if v is not None else ir.Constant(PTR, None) for v in heavy.inputs]
    out = ctx.outputs[0]
    ctx.b.call(fn, [*args, out.ptr, ctx.scratch])

    def tail(E, xs):
        env = compute_nodes(E, chain, {id(heavy.outputs[0]): xs[0], **{id(v): x for v, x in zip(operands, xs[1:])}})
        return [env[id(chain[-1].outputs[0])]]

    inputs = [out, *(outer[id(v)] for v in operands)]
    emit_pointwise_outputs(ctx.b, ctx.module, [out], inputs, tail, work=element_work(chain, [heavy.outputs[0], *operands]))


def compute_nodes(E: LLVMScalarOps, nodes, env: dict) -> dict:
    """Each elementwise node's compute rule on scalars, in order: ``env`` maps id(value) to its
    scalar (the inputs on entry; every node output added)."""
    for node in nodes:
        args = [env[id(v)] if v is not None else None for v in node.inputs]
        env[id(node.outputs[0])] = E.typed(node.op.compute(E, node.attrs, *args), node.outputs[0].type.dtype)
    return env


class _ElementWork:
    """A ScalarOps that emits nothing: compute rules run on dtypes instead of values, and it
    adds up what one element costs, in plain passes over it (a Relu is 1): each inline float32
    math function by what it measured (``INLINE_F32_COST``), a libm call per element far more,
    a division or square root one more pass; other arithmetic rides on the pass."""

    def __init__(self) -> None:
        self.units = 1.0

    def typed(self, value: DType, dtype: DType) -> DType:
        return dtype

    def const(self, value, like: DType) -> DType:
        return like

    def cast(self, a: DType, dtype: DType) -> DType:
        return dtype

    def cast_like(self, a: DType, like: DType) -> DType:
        return like

    def div(self, a: DType, b: DType) -> DType:
        self.units += 1.0
        return a

    def call(self, fn: str, *args: DType) -> DType:
        inline = args[0] is DType.float32 and fn in INLINE_F32
        self.units += INLINE_F32_COST[fn] if inline else 1.0 if fn in ("sqrt", "fabs", "floor", "ceil", "round") else LIBM_CALL_COST
        return args[0]

    def __getattr__(self, name: str):  # the rest of ScalarOps: the first operand's dtype (bool for tests)
        test = name in ("lt", "le", "gt", "ge", "eq", "isnan") or name.startswith("logical_")
        return lambda *args: DType.bool if test else args[1 if name == "select" else 0]


def element_work(nodes, inputs) -> float:
    """What computing one element of ``nodes`` (elementwise, with compute rules, in order) from
    ``inputs`` costs, in plain passes: how the pool decides whether to split the loop."""
    work = _ElementWork()
    compute_nodes(work, nodes, {id(v): v.type.dtype for v in inputs})
    return work.units


def _fused_pointwise(ctx: KernelContext, body) -> None:
    """One loop nest: each body node's compute rule evaluated at the output index; every
    output of the group stored from it."""
    shape = ctx.outputs[0].shape
    inputs = [v.broadcast_to(shape) if v is not None else None for v in ctx.inputs]

    def evaluate(E: LLVMScalarOps, loaded: list) -> list:
        env = compute_nodes(E, body.nodes, {id(v): x for v, x in zip(body.inputs, loaded)})
        return [env[id(v)] for v in body.outputs]

    emit_pointwise_outputs(ctx.b, ctx.module, ctx.outputs, inputs, evaluate, work=element_work(body.nodes, body.inputs))


@kernel("BatchNormalization")
def batch_norm(ctx: KernelContext) -> None:
    node = ctx.node
    if node.attrs["training_mode"] or len(node.outputs) > 1:
        raise KilnError(f"node {node.name!r}: training-mode BatchNormalization has no LLVM kernel yet")
    x = ctx.inputs[0]
    rank = len(x.shape)
    # per-channel parameters as views that run along axis 1 only
    channel = [View(v.ptr, v.dtype, tuple(1 if i != 1 else x.shape[1] for i in range(rank)), tuple(1 if i == 1 else 0 for i in range(rank))) for v in ctx.inputs[1:]]
    eps = node.attrs["epsilon"]

    def bn(E: LLVMScalarOps, xs: list) -> ir.Value:
        value, scale, shift, mean, var = xs
        inv = E.div(E.const(1.0, value), E.call("sqrt", E.add(var, E.const(eps, value))))
        return E.add(E.mul(E.mul(E.sub(value, mean), inv), scale), shift)

    emit_pointwise(ctx.b, ctx.module, ctx.outputs[0], [x, *channel], bn)

