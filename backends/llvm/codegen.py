"""LLVM code generation: one function per node (or fused group) and ``kiln_main``, which runs
the whole graph over one arena: a run from Python is one native call.

``kiln_main(ptr table)`` reads ``table = [inputs..., parameters..., arena]``. Every node output
lives in the arena at the offset the memory plan gives; scratch space (im2col columns, fused
bodies' intermediates) follows the planned region.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import llvmlite.ir as ir

from kiln.errors import KilnError
from kiln.ir.graph import Graph, Node, Value
from kiln.ir.text import print_graph
from kiln.passes.plan_memory import MemoryPlan, check_plan, plan_memory
from kiln.backends.llvm.emit import PTR, View, const_i64

ENTRY = "kiln_main"


@dataclass
class KernelContext:
    """What a kernel emitter gets: a builder inside the kernel's function, typed views of its
    operands (None for absent optional inputs) and a scratch pointer."""

    b: ir.IRBuilder
    module: ir.Module
    node: Node
    inputs: list[View | None]
    outputs: list[View]
    scratch: ir.Value
    codegen: "Codegen"


KernelEmitter = Callable[[KernelContext], None]
ScratchRule = Callable[[Node], int]


@dataclass
class KernelRule:
    emit: KernelEmitter
    scratch: ScratchRule | None = None


KERNELS: dict[str, KernelRule] = {}


def kernel(*ops: str, scratch: ScratchRule | None = None) -> Callable[[KernelEmitter], KernelEmitter]:
    """Register the decorated function as the LLVM kernel of ``ops``."""

    def wrap(fn: KernelEmitter) -> KernelEmitter:
        for op in ops:
            if op in KERNELS:
                raise ValueError(f"two LLVM kernels for {op}")
            KERNELS[op] = KernelRule(fn, scratch)
        return fn

    return wrap


def _load_kernels() -> None:
    from kiln.backends.llvm import kernels_data, kernels_elementwise, kernels_nn  # noqa: F401


def kernel_rule(node: Node) -> KernelRule | None:
    _load_kernels()
    rule = KERNELS.get(node.op.name)
    if rule is None and node.op.compute is not None:
        return KERNELS["<elementwise>"]
    return rule


def unsupported_ops(graph: Graph) -> list[str]:
    """Ops of ``graph`` (fused bodies included) that have no LLVM kernel yet."""
    missing: set[str] = set()
    for node in graph.nodes:
        if node.op.name == "Fused":
            missing |= set(unsupported_ops(node.attrs["body"]))
        elif kernel_rule(node) is None:
            missing.add(node.op.name)
    return sorted(missing)


def scratch_bytes(node: Node) -> int:
    rule = kernel_rule(node)
    return rule.scratch(node) if rule is not None and rule.scratch is not None else 0


@dataclass
class Codegen:
    module: ir.Module = field(default_factory=lambda: ir.Module(name="kiln"))
    _count: int = 0
    _emitted: dict[str, ir.Function] = field(default_factory=dict)

    def kernel_function(self, node: Node) -> ir.Function:
        """``node``'s kernel, ``void kernel_N(ptr in..., ptr out..., ptr scratch)``: emitted once
        per distinct signature (op, attributes, types), so repeated blocks share their code."""
        key = kernel_signature(node)
        if key not in self._emitted:
            self._emitted[key] = self._emit_kernel(node)
        return self._emitted[key]

    def _emit_kernel(self, node: Node) -> ir.Function:
        rule = kernel_rule(node)
        if rule is None:
            raise KilnError(f"node {node.name or node.op.name!r}: no LLVM kernel for {node.op.name} yet")
        n_args = len(node.inputs) + len(node.outputs) + 1
        fn = ir.Function(self.module, ir.FunctionType(ir.VoidType(), [PTR] * n_args), f"kernel_{self._count}_{node.op.name}")
        self._count += 1
        fn.linkage = "internal"
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        args = list(fn.args)
        ins = [View.dense(args[i], v.type.dtype, v.type.shape) if v is not None else None for i, v in enumerate(node.inputs)]
        outs = [View.dense(args[len(ins) + i], v.type.dtype, v.type.shape) for i, v in enumerate(node.outputs)]
        rule.emit(KernelContext(b, self.module, node, ins, outs, args[-1], self))
        b.ret_void()
        return fn

    def emit_program(self, graph: Graph, plan: MemoryPlan, b: ir.IRBuilder, pointer: Callable[[Value], ir.Value], scratch: ir.Value) -> None:
        """Call each node's kernel in order; ``pointer(v)`` addresses values outside the plan."""
        offsets = {id(v): buf.offset for buf in plan.buffers for v in buf.values}
        arena_base = scratch  # the caller's scratch is where this program's planned region starts

        def address(v: Value) -> ir.Value:
            if id(v) in offsets:
                return b.gep(arena_base, [const_i64(offsets[id(v)])], source_etype=ir.IntType(8))
            return pointer(v)

        inner_scratch = b.gep(arena_base, [const_i64(plan.arena_bytes)], source_etype=ir.IntType(8))
        for node in graph.nodes:
            fn = self.kernel_function(node)
            args = [address(v) if v is not None else ir.Constant(PTR, None) for v in node.inputs]
            args += [address(v) for v in node.outputs]
            args.append(inner_scratch)
            b.call(fn, args)


def kernel_signature(node: Node) -> str:
    """What a kernel's code depends on: op, attributes (a fused body by its canonical text,
    parameters included by content hash) and the types of its inputs and outputs."""
    attrs = {k: print_graph(v, canonical=True) if isinstance(v, Graph) else repr(v) for k, v in node.attrs.items()}
    ins = [str(v.type) if v is not None else "_" for v in node.inputs]
    return repr((node.op.name, sorted(attrs.items()), ins, [str(v.type) for v in node.outputs]))


def program_bytes(graph: Graph, plan: MemoryPlan) -> int:
    """Planned bytes plus the largest scratch any node needs."""
    return plan.arena_bytes + max((scratch_bytes(n) for n in graph.nodes), default=0)


def generate(graph: Graph) -> tuple[ir.Module, MemoryPlan, int]:
    """The LLVM module for ``graph``, its memory plan and the total arena bytes."""
    missing = unsupported_ops(graph)
    if missing:
        raise KilnError(f"the llvm target has no kernels yet for: {', '.join(missing)}")
    plan = plan_memory(graph)
    check_plan(graph, plan)
    cg = Codegen()
    entry = ir.Function(cg.module, ir.FunctionType(ir.VoidType(), [PTR]), ENTRY)
    b = ir.IRBuilder(entry.append_basic_block("entry"))
    table = entry.args[0]
    slots = {id(v): i for i, v in enumerate([*graph.inputs, *graph.params])}
    loaded: dict[int, ir.Value] = {}

    def pointer(v: Value) -> ir.Value:
        if id(v) not in slots:
            raise KilnError(f"value %{v.name} has no storage")
        if id(v) not in loaded:
            loaded[id(v)] = b.load(b.gep(table, [const_i64(slots[id(v)])], source_etype=PTR), typ=PTR)
        return loaded[id(v)]

    arena = b.load(b.gep(table, [const_i64(len(slots))], source_etype=PTR), typ=PTR)
    cg.emit_program(graph, plan, b, pointer, arena)
    b.ret_void()
    return cg.module, plan, program_bytes(graph, plan)

