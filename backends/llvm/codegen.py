"""LLVM code generation: one function per node (or fused group) and ``kiln_main``, which runs
the whole graph over one arena: a run from Python is one native call.

``kiln_main(ptr table)`` reads ``table = [inputs..., parameters..., packed parameters...,
arena]``: constant GEMM operands some kernel takes in panels come packed too. Every node output
lives in the arena at the offset the memory plan gives; scratch space (im2col columns, fused
bodies' intermediates) follows the planned region.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import llvmlite.ir as ir
import numpy as np

from kiln import config
from kiln.errors import KilnError
from kiln.ir.graph import Graph, Node, Value
from kiln.ir.text import print_graph
from kiln.passes.plan_memory import MemoryPlan, check_plan, plan_memory
from kiln.backends.llvm.emit import PTR, Panels, View, const_i64, flush_denormals, pack_into_panels, restore_mxcsr
from kiln.backends.llvm.pool import SUBMIT, WAKE

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


@dataclass(frozen=True)
class PanelSpec:
    """How a kernel takes a constant GEMM operand packed (``emit.Panels``): the (k, n) matrix
    it multiplies by, read from the parameter as is or, with ``transpose``, as its (n, k)
    transpose; ``nr`` columns to a panel. ``quads`` > 0 packs bytes for VNNI's 4-way dot
    products: K goes in segments of ``quads`` rows (a tap's channels), each zero-padded to a
    multiple of 4, and a panel holds each group of 4 rows column by column (4 bytes a column);
    with ``sums``, then a row of each of its columns' sums over K (int32: what a zero point
    times the weights takes off each sum)."""

    k: int
    n: int
    nr: int
    transpose: bool = False
    quads: int = 0
    sums: bool = False

    def to_json(self) -> dict:
        return {"k": self.k, "n": self.n, "nr": self.nr, "transpose": self.transpose, "quads": self.quads, "sums": self.sums}


PanelRule = Callable[[Node, int], "PanelSpec | None"]


@dataclass
class KernelRule:
    emit: KernelEmitter
    scratch: ScratchRule | None = None
    panels: PanelRule | None = None  # which inputs the kernel takes packed, when they are constants


KERNELS: dict[str, KernelRule] = {}


def kernel(*ops: str, scratch: ScratchRule | None = None, panels: PanelRule | None = None) -> Callable[[KernelEmitter], KernelEmitter]:
    """Register the decorated function as the LLVM kernel of ``ops``."""

    def wrap(fn: KernelEmitter) -> KernelEmitter:
        for op in ops:
            if op in KERNELS:
                raise ValueError(f"two LLVM kernels for {op}")
            KERNELS[op] = KernelRule(fn, scratch, panels)
        return fn

    return wrap


def _load_kernels() -> None:
    from kiln.backends.llvm import kernels_conv_transpose, kernels_data, kernels_elementwise, kernels_image, kernels_index, kernels_integer, kernels_linalg, kernels_nn, kernels_quant  # noqa: F401


def kernel_rule(node: Node) -> KernelRule | None:
    _load_kernels()
    rule = KERNELS.get(node.op.name)
    if rule is None and node.op.compute is not None:
        return KERNELS["<elementwise>"]
    return rule


def decomposes(node: Node) -> bool:
    """Whether the backend's ``decompose`` lowering expresses ``node`` through other ops: it
    has no kernel, or its decomposition runs faster (a contraction Einsum becomes one MatMul,
    the micro-kernel instead of a loop nest; a rule that cannot express the node leaves it)."""
    return node.op.name == "Einsum" or lacks_kernel(node)


def lacks_kernel(node: Node) -> bool:
    """Whether no kernel runs ``node`` (the backend's ``decompose`` lowering expresses it through others)."""
    if node.op.name == "BatchNormalization":
        return bool(node.attrs["training_mode"]) or len(node.outputs) > 1
    if node.op.name in ("ConvInteger", "MatMulInteger"):  # 8-bit by int8 on VNNI; the rest decompose
        from kiln.backends.llvm.kernels_integer import applies

        return not applies(node)
    if node.op.name == "LayerNormalization":  # the kernel reads scale and bias whole per row
        trailing = node.inputs[0].type.shape[node.attrs["axis"] % node.inputs[0].type.rank :]
        return any(_broadcast_within(v.type.shape, trailing) for v in node.inputs[1:] if v is not None)
    return kernel_rule(node) is None


def _broadcast_within(shape, trailing) -> bool:
    padded = (1,) * (len(trailing) - len(shape)) + tuple(shape)
    return any(t != 1 and p != t for p, t in zip(padded, trailing))


def unsupported_ops(graph: Graph) -> list[str]:
    """Ops of ``graph`` (fused bodies included) that have no LLVM kernel yet."""
    missing: set[str] = set()
    for node in graph.nodes:
        if node.op.name == "Fused":
            missing |= set(unsupported_ops(node.attrs["body"]))
        elif kernel_rule(node) is None:
            missing.add(node.op.name)
    return sorted(missing)


def panel_spec(node: Node, i: int) -> PanelSpec | None:
    """How ``node``'s kernel takes input ``i`` packed, or None. A Fused group takes an input
    packed when every body node that reads it does, the same way."""
    if node.op.name == "Fused":
        body = node.attrs["body"]
        value = body.inputs[i]
        uses = [(n, k) for n in body.nodes for k, v in enumerate(n.inputs) if v is value]
        specs = {panel_spec(n, k) for n, k in uses}
        if len(specs) != 1 or value in body.outputs:
            return None
        return specs.pop()
    rule = kernel_rule(node)
    return rule.panels(node, i) if rule is not None and rule.panels is not None else None


def pack_panels(array: np.ndarray, spec: PanelSpec) -> np.ndarray:
    """``array`` as ``spec``'s (k, n) matrix in panels: (ceil(n / nr), k, nr), zero-padded."""
    matrix = array.reshape(spec.n, spec.k).T if spec.transpose else array.reshape(spec.k, spec.n)
    count = -(-spec.n // spec.nr)
    if spec.quads:  # (segments, quads-padded segment, n) -> (panels, K / 4, nr, 4)
        segment = -(-spec.quads // 4) * 4
        segments = np.zeros((spec.k // spec.quads, segment, count * spec.nr), dtype=array.dtype)
        segments[:, : spec.quads, : spec.n] = matrix.reshape(-1, spec.quads, spec.n)
        rows = segments.shape[0] * segment
        panels = segments.reshape(rows // 4, 4, count, spec.nr).transpose(2, 0, 3, 1)
        if spec.sums:  # (panels, K / 4 + 1, nr, 4): each column's int32 sum as its 4 bytes
            sums = segments.astype(np.int32).sum(axis=(0, 1)).astype("<i4").view(array.dtype).reshape(count, 1, spec.nr, 4)
            panels = np.concatenate([panels, sums], axis=1)
        return np.ascontiguousarray(panels)
    padded = np.zeros((spec.k, count * spec.nr), dtype=array.dtype)
    padded[:, : spec.n] = matrix
    return np.ascontiguousarray(padded.reshape(spec.k, count, spec.nr).transpose(1, 0, 2))


def scratch_bytes(node: Node) -> int:
    rule = kernel_rule(node)
    return rule.scratch(node) if rule is not None and rule.scratch is not None else 0


@dataclass
class Codegen:
    module: ir.Module = field(default_factory=lambda: ir.Module(name="kiln"))
    _count: int = 0
    _emitted: dict[str, ir.Function] = field(default_factory=dict)

    def kernel_function(self, node: Node, packed: frozenset[int] = frozenset(), strides: tuple = (), in_place: tuple = ()) -> ir.Function:
        """``node``'s kernel, ``void kernel_N(ptr in..., ptr out..., ptr scratch)``: emitted once
        per distinct signature (op, attributes, types, which inputs come packed, the strides of
        inputs that are strided views: None for dense ones, which outputs are written over which
        inputs), so repeated blocks share their code.

        ``in_place`` pairs (output k, input j) whose buffers the plan made one: the kernel writes
        output k through input j's pointer. Through two pointers that are equal only at run time,
        LLVM's vectorized loops find them overlapping and fall back to their scalar loops
        (EfficientNet-B0's in-place Muls: 0.73 -> 0.64 ms a run)."""
        key = kernel_signature(node) + repr(sorted(packed)) + (repr(strides) if any(strides) else "") + (repr(in_place) if in_place else "")
        if key not in self._emitted:
            self._emitted[key] = self._emit_kernel(node, packed, strides, in_place)
        return self._emitted[key]

    def _emit_kernel(self, node: Node, packed: frozenset[int], strides: tuple = (), in_place: tuple = ()) -> ir.Function:
        rule = kernel_rule(node)
        if rule is None:
            raise KilnError(f"node {node.name or node.op.name!r}: no LLVM kernel for {node.op.name} yet")
        n_args = len(node.inputs) + len(node.outputs) + 1
        fn = ir.Function(self.module, ir.FunctionType(ir.VoidType(), [PTR] * n_args), f"kernel_{self._count}_{node.op.name}")
        self._count += 1
        fn.linkage = "internal"
        # kernels stay functions: inlined, every once-called kernel made kiln_main one function
        # of ~40K instructions, which the optimizer and instruction selection handle superlinearly
        fn.attributes.add("noinline")
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        args = list(fn.args)
        ins = [View.dense(args[i], v.type.dtype, v.type.shape) if v is not None else None for i, v in enumerate(node.inputs)]
        for i, step in enumerate(strides):  # a strided view (a part of an inner-axis Split)
            if step is not None:
                ins[i] = View(args[i], node.inputs[i].type.dtype, node.inputs[i].type.shape, step)
        for i in packed:  # a constant GEMM operand in panels (its view has the matrix's shape)
            spec = panel_spec(node, i)
            ins[i] = Panels(args[i], node.inputs[i].type.dtype, (spec.k, spec.n), (spec.nr, 1), 0, spec.nr)
        outs = [View.dense(args[len(ins) + i], v.type.dtype, v.type.shape) for i, v in enumerate(node.outputs)]
        for k, j in in_place:
            outs[k] = View.dense(args[j], node.outputs[k].type.dtype, node.outputs[k].type.shape)
        rule.emit(KernelContext(b, self.module, node, ins, outs, args[-1], self))
        b.ret_void()
        return fn

    def emit_program(
        self,
        graph: Graph,
        plan: MemoryPlan,
        b: ir.IRBuilder,
        pointer: Callable[[Value], ir.Value],
        scratch: ir.Value,
        guards: bool = False,
        profile: bool = False,
        packed: Callable[[Node, int], ir.Value | None] = lambda node, i: None,
    ) -> None:
        """Call each node's kernel in order; ``pointer(v)`` addresses values outside the plan,
        and ``packed(node, i)`` input i in panels where the program holds it so.

        With ``profile`` the cycle counter is read around every call and the difference added to
        ``kiln_profile[index]`` (the runtime turns the counts into seconds).

        With ``guards`` (the bounds-checked build; the plan reserved GUARD_BYTES after every
        buffer) the bytes after each output and after the node's scratch are filled with a
        pattern before the call and checked after it; the first node that changed them is
        recorded in ``kiln_bounds_error`` (its index + 1) for the runtime to report."""
        offsets = plan.offsets()
        arena_base = scratch  # the caller's scratch is where this program's planned region starts

        def address(v: Value) -> ir.Value:
            if id(v) in offsets:
                return b.gep(arena_base, [const_i64(offsets[id(v)])], source_etype=ir.IntType(8))
            return pointer(v)

        inner_scratch = b.gep(arena_base, [const_i64(plan.arena_bytes)], source_etype=ir.IntType(8))
        ticks = profile_global(self.module, len(graph.nodes)) if profile else None
        for index, node in enumerate(graph.nodes):
            if all(plan.is_view(v) for v in node.outputs):  # its outputs are its input's bytes
                continue
            panels = {i: ptr for i in range(len(node.inputs)) if (ptr := packed(node, i)) is not None}
            strides = tuple(plan.strides.get(id(v)) if v is not None else None for v in node.inputs)
            fn = self.kernel_function(node, frozenset(panels), strides, _in_place(node, offsets, panels, strides))
            args = [panels.get(i) or (address(v) if v is not None else ir.Constant(PTR, None)) for i, v in enumerate(node.inputs)]
            args += [address(v) for v in node.outputs]
            args.append(inner_scratch)
            if ticks is not None:
                _timed_call(b, fn, args, ticks, index)
                continue
            if not guards:
                b.call(fn, args)
                continue
            regions = [b.gep(address(v), [const_i64(v.type.nbytes)], source_etype=ir.IntType(8)) for v in node.outputs]
            regions.append(b.gep(inner_scratch, [const_i64(scratch_bytes(node))], source_etype=ir.IntType(8)))
            for region in regions:
                _fill_guard(b, region)
            b.call(fn, args)
            broken = ir.Constant(ir.IntType(1), 0)
            for region in regions:
                broken = b.or_(broken, _guard_broken(b, region))
            flag = bounds_error_global(self.module)
            first = b.icmp_signed("==", b.load(flag, typ=ir.IntType(64)), const_i64(0))
            with b.if_then(b.and_(broken, first)):
                b.store(const_i64(index + 1), flag)


def _in_place(node: Node, offsets: dict[int, int], panels: dict, strides: tuple) -> tuple[tuple[int, int], ...]:
    """(output k, input j) for each output the plan put in a dense input's buffer."""
    dense: dict[int, int] = {}  # arena offset -> the first dense input there
    for j, v in enumerate(node.inputs):
        if v is not None and id(v) in offsets and j not in panels and strides[j] is None:
            dense.setdefault(offsets[id(v)], j)
    pairs = []
    for k, out in enumerate(node.outputs):
        j = dense.get(offsets.get(id(out), -1))
        if j is not None and node.inputs[j].type.nbytes == out.type.nbytes:
            pairs.append((k, j))
    return tuple(pairs)


PROFILE = "kiln_profile"


def profile_global(module: ir.Module, count: int) -> ir.GlobalVariable:
    """``i64 kiln_profile[count]``: cycles spent in each node's kernel, summed over runs."""
    ticks = ir.GlobalVariable(module, ir.ArrayType(ir.IntType(64), count), PROFILE)
    ticks.initializer = ir.Constant(ticks.value_type, [0] * count)
    return ticks


def _timed_call(b: ir.IRBuilder, fn: ir.Function, args: list, ticks: ir.GlobalVariable, index: int) -> None:
    module = b.module
    counter = module.declare_intrinsic("llvm.readcyclecounter", (), ir.FunctionType(ir.IntType(64), []))
    start = b.call(counter, [])
    b.call(fn, args)
    spent = b.sub(b.call(counter, []), start)
    slot = b.gep(b.bitcast(ticks, ir.IntType(64).as_pointer()), [const_i64(index)])
    b.store(b.add(b.load(slot, typ=ir.IntType(64)), spent), slot)


GUARD_BYTES = 64
GUARD_WORD = 0xA5A5A5A5A5A5A5A5
BOUNDS_ERROR = "kiln_bounds_error"


def bounds_error_global(module: ir.Module) -> ir.GlobalVariable:
    """``i64 kiln_bounds_error``: 0, or the index + 1 of the first node that broke a guard."""
    existing = module.globals.get(BOUNDS_ERROR)
    if existing is not None:
        return existing
    flag = ir.GlobalVariable(module, ir.IntType(64), BOUNDS_ERROR)
    flag.initializer = const_i64(0)
    return flag


def _fill_guard(b: ir.IRBuilder, region: ir.Value) -> None:
    word = ir.Constant(ir.IntType(64), GUARD_WORD)
    for i in range(GUARD_BYTES // 8):
        b.store(word, b.gep(region, [const_i64(8 * i)], source_etype=ir.IntType(8)), align=1)


def _guard_broken(b: ir.IRBuilder, region: ir.Value) -> ir.Value:
    broken = ir.Constant(ir.IntType(1), 0)
    word = ir.Constant(ir.IntType(64), GUARD_WORD)
    for i in range(GUARD_BYTES // 8):
        value = b.load(b.gep(region, [const_i64(8 * i)], source_etype=ir.IntType(8)), typ=ir.IntType(64), align=1)
        broken = b.or_(broken, b.icmp_unsigned("!=", value, word))
    return broken


def kernel_signature(node: Node) -> str:
    """What a kernel's code depends on: op, attributes (a fused body by its canonical text,
    parameters included by content hash) and the types of its inputs and outputs."""
    attrs = {k: print_graph(v, canonical=True) if isinstance(v, Graph) else repr(v) for k, v in node.attrs.items()}
    ins = [str(v.type) if v is not None else "_" for v in node.inputs]
    return repr((node.op.name, sorted(attrs.items()), ins, [str(v.type) for v in node.outputs]))


def program_bytes(graph: Graph, plan: MemoryPlan, guard: int = 0) -> int:
    """Planned bytes plus the largest scratch any node needs (plus its guard)."""
    return plan.arena_bytes + max((scratch_bytes(n) for n in graph.nodes), default=0) + guard


def runtime_panels(graph: Graph) -> list[tuple[Value, PanelSpec]]:
    """Matrices computed (or fed) at run time that several nodes read packed the same way (an
    unrolled LSTM's recurrent weights in a training step: 64 GEMMs each): packed once, at the
    first reader, into their own arena region."""
    readers: dict[tuple[int, PanelSpec], tuple[Value, int]] = {}
    for node in graph.nodes:
        for i, v in enumerate(node.inputs):
            if v is None or v in graph.params or v.type.rank != 2 or (spec := panel_spec(node, i)) is None:
                continue
            if spec.transpose or spec.quads or (spec.k, spec.n) != tuple(v.type.shape):
                continue
            count = readers.get((id(v), spec), (v, 0))[1]
            readers[(id(v), spec)] = (v, count + 1)
    return [(v, spec) for (_, spec), (v, count) in readers.items() if count >= 2]


def _panel_bytes(v: Value, spec: PanelSpec) -> int:
    k = spec.k // spec.quads * -(-spec.quads // 4) * 4 + 4 * spec.sums if spec.quads else spec.k
    return -(-spec.n // spec.nr) * spec.nr * k * v.type.dtype.itemsize


def constant_panels(graph: Graph) -> list[tuple[Value, PanelSpec]]:
    """The parameters some kernel takes packed, each with its packing (in table order)."""
    wanted: dict[tuple[int, PanelSpec], tuple[Value, PanelSpec]] = {}
    for node in graph.nodes:
        for i, v in enumerate(node.inputs):
            if v is not None and v in graph.params and (spec := panel_spec(node, i)) is not None:
                wanted.setdefault((id(v), spec), (v, spec))
    return list(wanted.values())


def donated_outputs(graph: Graph) -> dict[int, int]:
    """id(output) -> the index of the graph input whose array it is written over, for each
    ``graph.donations`` pair (output name -> input name; ``kiln.compile(donate=...)``) where
    that is safe: the same type, no node reads the input after the output's producer, and a
    producer that reads the input itself does so elementwise (each element read before it is
    written). Bounds-checked builds donate nothing (their guards would land past the array)."""
    wanted = getattr(graph, "donations", None) or {}
    if not wanted or config.flags().check_bounds:
        return {}
    from kiln.backends.llvm.kernels_elementwise import is_pointwise

    inputs = {v.name: (k, v) for k, v in enumerate(graph.inputs)}
    outputs = {v.name: v for v in graph.outputs}
    producer = {id(v): (i, n) for i, n in enumerate(graph.nodes) for v in n.outputs}
    last_read: dict[int, int] = {}
    for i, node in enumerate(graph.nodes):
        for v in node.inputs:
            if v is not None:
                last_read[id(v)] = i
    donated: dict[int, int] = {}
    for out_name, in_name in wanted.items():
        out, (slot, source) = outputs.get(out_name), inputs.get(in_name, (None, None))
        if out is None or source is None or id(out) not in producer or out.type != source.type:
            continue
        if source in graph.outputs or graph.outputs.count(out) > 1 or slot in donated.values():
            continue
        index, node = producer[id(out)]
        if last_read.get(id(source), -1) > index:
            continue  # read after it would be overwritten
        if any(v is source for v in node.inputs) and not is_pointwise(node):
            continue
        donated[id(out)] = slot
    return donated


def written_outputs(graph: Graph, donated: dict[int, int]) -> list[Value]:
    """The graph outputs ``kiln_main`` writes straight into arrays the runtime hands it each run
    (no copy out of the arena): each computed output listed once that is not donated. In the
    bounds-checked build none are (the guards would land past the arrays)."""
    if config.flags().check_bounds:
        return []
    computed = {id(v) for n in graph.nodes for v in n.outputs}
    return [v for v in dict.fromkeys(graph.outputs) if id(v) in computed and id(v) not in donated and graph.outputs.count(v) == 1]


def generate(graph: Graph) -> tuple[ir.Module, MemoryPlan, int, list[tuple[Value, PanelSpec]]]:
    """The LLVM module for ``graph``, its memory plan, the total arena bytes and the packed
    parameters ``kiln_main``'s table holds after the parameters.

    ``kiln_main(ptr table)`` reads ``table = [inputs..., parameters..., packed..., arena,
    written outputs...]``."""
    missing = unsupported_ops(graph)
    if missing:
        raise KilnError(f"the llvm target has no kernels yet for: {', '.join(missing)}")
    guards = config.flags().check_bounds
    donated = donated_outputs(graph)
    written = written_outputs(graph, donated)
    from kiln.backends.llvm.kernels_elementwise import is_pointwise

    plan = plan_memory(graph, guard=GUARD_BYTES if guards else 0, external=frozenset(donated) | {id(v) for v in written}, strided_readers=is_pointwise)
    check_plan(graph, plan)
    cg = Codegen()
    entry = ir.Function(cg.module, ir.FunctionType(ir.VoidType(), [PTR]), ENTRY)
    b = ir.IRBuilder(entry.append_basic_block("entry"))
    table = entry.args[0]
    constants = len(graph.inputs) + len(graph.params)
    slots = {id(v): i for i, v in enumerate([*graph.inputs, *graph.params])}
    slots.update(donated)  # a donated output is written over its input's array
    loaded: dict[int, ir.Value] = {}

    def pointer(v: Value) -> ir.Value:
        if id(v) not in slots:
            raise KilnError(f"value %{v.name} has no storage")
        if id(v) not in loaded:
            loaded[id(v)] = b.load(b.gep(table, [const_i64(slots[id(v)])], source_etype=PTR), typ=PTR)
        return loaded[id(v)]

    panels = constant_panels(graph)
    panel_slots = {(id(v), spec): constants + k for k, (v, spec) in enumerate(panels)}
    slots.update({id(v): constants + len(panels) + 1 + k for k, v in enumerate(written)})  # past the arena

    arena = b.load(b.gep(table, [const_i64(constants + len(panels))], source_etype=PTR), typ=PTR)
    planned = program_bytes(graph, plan, GUARD_BYTES if guards else 0)
    regions: dict[tuple[int, PanelSpec], int] = {}  # run-time panels: arena offsets past the program
    end = planned
    for v, spec in runtime_panels(graph):
        regions[(id(v), spec)] = end
        end += _panel_bytes(v, spec)
    filled: dict[tuple[int, PanelSpec], ir.Value] = {}
    offsets = plan.offsets()

    def packed(node: Node, i: int) -> ir.Value | None:
        v = node.inputs[i]
        if v is None:
            return None
        spec = panel_spec(node, i)
        if v in graph.params:
            slot = panel_slots.get((id(v), spec))
            return b.load(b.gep(table, [const_i64(slot)], source_etype=PTR), typ=PTR) if slot is not None else None
        key = (id(v), spec)
        if key not in regions:
            return None
        if key not in filled:  # the first reader: pack it now
            target = b.gep(arena, [const_i64(regions[key])], source_etype=ir.IntType(8))
            source = b.gep(arena, [const_i64(offsets[id(v)])], source_etype=ir.IntType(8)) if id(v) in offsets else pointer(v)
            pack_into_panels(b, View.dense(source, v.type.dtype, v.type.shape), Panels(target, v.type.dtype, (spec.k, spec.n), (spec.nr, 1), 0, spec.nr))
            filled[key] = target
        return filled[key]

    if guards:
        b.store(const_i64(0), bounds_error_global(cg.module))
    mxcsr = flush_denormals(b)
    cg.emit_program(graph, plan, b, pointer, arena, guards, config.flags().profile, packed)
    restore_mxcsr(b, mxcsr)
    b.ret_void()
    if SUBMIT in cg.module.globals:  # the run hands blocks to the pool: wake its workers first
        b.position_at_start(entry.entry_basic_block)
        b.call(ir.Function(cg.module, ir.FunctionType(ir.VoidType(), []), WAKE), [])
    return cg.module, plan, end, panels

