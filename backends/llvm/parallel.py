"""Splitting a kernel's rows over the process's worker pool (``pool.py``).

``parallel_rows`` emits one worker function per block and hands them, with their argument
blocks, to ``kiln_pool_submit``; the calling thread runs the first block itself, then waits.
GEMMs, convolutions and large elementwise loops use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import llvmlite.ir as ir

from kiln.backends.llvm.emit import PTR, const_i64, flush_denormals, restore_mxcsr


@dataclass
class Emitting:
    """The part of a KernelContext a block emitter uses: a builder (in the block's function) and the module."""

    b: ir.IRBuilder
    module: ir.Module


def entry_array(b: ir.IRBuilder, ty: ir.Type, count: int) -> ir.Value:
    here = b.block
    b.position_at_start(b.function.entry_basic_block)
    slot = b.alloca(ty, size=const_i64(count))
    b.position_at_end(here)
    return slot


def parallel_rows(ctx, rows: int, threads: int, pointers: list[ir.Value], emit, align: int = 1) -> None:
    """Rows [0, rows) split over ``threads``: ``emit(emitting, pointers, lo, hi, block)`` writes
    the code for block number ``block`` (0 is this thread's; a block's scratch may be its own).
    Blocks 1.. are worker functions emitted here, handed with their argument blocks
    (``pointers``) to the process's worker pool (``pool.py``: no thread start, no Python
    per task); this thread runs the first block, then waits for the rest. Block starts are
    multiples of ``align``. With fewer than two threads the rows are one block, emitted here
    with no pool call."""
    from kiln.backends.llvm.pool import SUBMIT, WAIT

    if threads < 2:
        emit(ctx, pointers, 0, rows, 0)
        return
    b, module = ctx.b, ctx.module
    bounds = [min(rows, (rows * t // threads + align - 1) // align * align) for t in range(threads)] + [rows]
    blocks = [(bounds[t], bounds[t + 1]) for t in range(1, threads) if bounds[t] < bounds[t + 1]]
    i32 = ir.IntType(32)
    submit = module.globals.get(SUBMIT) or ir.Function(module, ir.FunctionType(i32, [PTR, PTR, ir.IntType(64)]), SUBMIT)
    wait = module.globals.get(WAIT) or ir.Function(module, ir.FunctionType(ir.VoidType(), []), WAIT)
    fns, args = entry_array(b, PTR, max(1, len(blocks))), entry_array(b, PTR, max(1, len(blocks)))
    for index, (lo, hi) in enumerate(blocks):
        worker = ir.Function(module, ir.FunctionType(PTR, [PTR]), module.get_unique_name("rows"))
        worker.linkage = "internal"
        wb = ir.IRBuilder(worker.append_basic_block("entry"))
        mxcsr = flush_denormals(wb)  # a worker thread's own floating-point mode, as kiln_main's
        passed = [wb.load(wb.gep(worker.args[0], [const_i64(i)], source_etype=PTR), typ=PTR) for i in range(len(pointers))]
        emit(Emitting(wb, module), passed, lo, hi, index + 1)
        restore_mxcsr(wb, mxcsr)
        wb.ret(ir.Constant(PTR, None))
        block_args = entry_array(b, PTR, len(pointers))
        for i, ptr in enumerate(pointers):
            b.store(ptr, b.gep(block_args, [const_i64(i)], source_etype=PTR))
        b.store(worker, b.gep(fns, [const_i64(index)], source_etype=PTR))
        b.store(block_args, b.gep(args, [const_i64(index)], source_etype=PTR))
    dispatched = b.call(submit, [fns, args, const_i64(len(blocks))]) if blocks else None
    emit(ctx, pointers, bounds[0], bounds[1], 0)
    if dispatched is not None:
        with b.if_then(b.icmp_unsigned("!=", dispatched, ir.Constant(i32, 0))):
            b.call(wait, [])
