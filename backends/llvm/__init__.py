"""The LLVM backend (``target="llvm"``): llvmlite code generation for the host CPU.

``build`` generates one module (a function per node or fused group, and ``kiln_main`` over the
planned arena), optimizes it at -O2 for the host CPU and emits object code, which an MCJIT engine
links in-process. The artifact stores that object code, so ``kiln.load`` never compiles again.
"""

from __future__ import annotations

import ctypes
import json
import threading
import time
from dataclasses import dataclass
from typing import Sequence

import llvmlite
import llvmlite.binding as llvm
import numpy as np

from kiln import config
from kiln.backends.llvm import pool, split
from kiln.backends.cache import cache_key, load_entry, store_entry
from kiln.backends.llvm.codegen import BOUNDS_ERROR, ENTRY, PROFILE, PanelSpec, decomposes, donated_outputs, generate, pack_panels, written_outputs
from kiln.backends.llvm.kernels_integer import available as integer_products_run_here
from kiln.backends.llvm.target import CPU, check_runs_here, host_cpu, target_machine
from kiln.errors import ArtifactError, KilnError
from kiln.ir.graph import Graph
from kiln.passes.decompose import Decompose
from kiln.passes.integer_products import IntegerProducts

ALIGN = 64


def compile_object(graph: Graph, cpu: CPU) -> tuple[bytes, dict]:
    """Object code for ``graph`` and the layout the runtime needs (arena size, output offsets)."""
    module, plan, arena_bytes, panels = generate(graph)
    donated = donated_outputs(graph)
    written = {id(v): k for k, v in enumerate(written_outputs(graph, donated))}
    machine = target_machine(cpu)
    module.triple = cpu.triple
    module.data_layout = str(machine.target_data)
    defined = {f.name for f in module.functions if not f.is_declaration}  # in one part or another
    cpu_fields = {"triple": cpu.triple, "name": cpu.name, "features": cpu.features}
    objects, declared = split.compile_parts(split.parts(module, ENTRY, config.num_threads()), cpu_fields)
    _check_symbols(declared - defined)
    layout = {
        "arena_bytes": arena_bytes,
        "checked_nodes": [f"{n.name or n.op.name!r} ({n.op.name})" for n in graph.nodes] if config.flags().check_bounds else None,
        "profiled_nodes": [[n.name or n.op.name, _op_label(n)] for n in graph.nodes] if config.flags().profile else None,
        "outputs": [_output_location(graph, plan, v, donated, written) for v in graph.outputs],
        "panels": [{"param": list(graph.params).index(v), **spec.to_json()} for v, spec in panels],
        "cpu": cpu_fields,
        "object_sizes": [len(obj) for obj in objects],  # the parts (``split``), one after another
    }
    return b"".join(objects), layout


def _op_label(node) -> str:
    """The op, or for a fused group its ops joined: ``Fused(Conv+Add+Relu)``."""
    if node.op.name != "Fused":
        return node.op.name
    return "Fused(" + "+".join(n.op.name for n in node.attrs["body"].nodes) + ")"


@dataclass(frozen=True)
class NodeTime:
    """One node's share of a profiled run (``KILN_PROFILE=1``): mean milliseconds per run."""

    node: str
    op: str
    ms: float
    share: float  # of the time spent in kernels


def _check_symbols(declared: set[str]) -> None:
    """Every function the code calls (``declared`` after -O2, not defined in a part) must exist
    in this process (libm, the worker pool), or running would crash."""
    pool.install()
    missing = [name for name in declared if not name.startswith("llvm.") and not llvm.address_of_symbol(name)]
    if missing:
        raise KilnError(f"the generated code calls functions this process does not have: {', '.join(sorted(missing))}")


def _output_location(graph: Graph, plan, value, donated: dict[int, int], written: dict[int, int]) -> dict:
    """Where the runtime finds an output: over a donated input's array, in an array it hands
    ``kiln_main`` for it (``written``), in the arena, or a parameter or input."""
    if id(value) in donated:
        return {"kind": "donated", "index": donated[id(value)]}
    if id(value) in written:
        return {"kind": "written", "index": written[id(value)]}
    if value in graph.params:
        return {"kind": "param", "index": list(graph.params).index(value)}
    if value in graph.inputs:
        return {"kind": "input", "index": graph.inputs.index(value)}
    return {"kind": "arena", "offset": plan.offset(value)}


def _empty_aligned(shape, dtype) -> np.ndarray:
    """An uninitialized array starting on a 64-byte boundary (the kernels' vector stores then
    never straddle two cache lines)."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + ALIGN, dtype=np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def _aligned(array: np.ndarray) -> np.ndarray:
    """``array`` C-contiguous at a 64-byte boundary (copied if it is not): the kernels' vector
    loads of weight rows then never straddle two cache lines."""
    if array.flags.c_contiguous and array.ctypes.data % ALIGN == 0:
        return array
    out = _empty_aligned(array.shape, array.dtype)
    out[...] = array
    return out


class LLVMExecutable:
    """Linked object code plus the arena and the pointer table ``kiln_main`` reads."""

    def __init__(self, graph: Graph, obj: bytes, layout: dict):
        cpu = CPU(**layout["cpu"])
        check_runs_here(cpu)
        self.graph = graph
        self.object_code = obj
        self.layout = layout
        machine = target_machine(cpu)
        pool.install()  # the worker pool kernels call by name
        self._engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), machine)
        bounds = np.cumsum([0, *(layout.get("object_sizes") or [len(obj)])])
        self._objects = [obj[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]  # kept while the engine lives
        for part in self._objects:
            self._engine.add_object_file(llvm.ObjectFileRef.from_data(part))
        self._engine.finalize_object()
        address = self._engine.get_function_address(ENTRY)
        if not address:
            raise KilnError("the object code has no kiln_main")
        self._main = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(address)
        self._checked = layout.get("checked_nodes")
        self._bounds_error = None
        if self._checked:  # the bounds-checked build: kiln_main records the first guard breaker
            self._bounds_error = ctypes.c_int64.from_address(self._engine.get_global_value_address(BOUNDS_ERROR))
        self._profiled = layout.get("profiled_nodes")
        if self._profiled:  # the profiled build: kiln_main sums each kernel's cycles here
            count = len(self._profiled)
            self._ticks = (ctypes.c_int64 * count).from_address(self._engine.get_global_value_address(PROFILE))
            self._runs, self._wall = 0, 0.0
        raw = np.zeros(layout["arena_bytes"] + ALIGN, dtype=np.uint8)
        start = (-raw.ctypes.data) % ALIGN
        self._arena = raw[start : start + layout["arena_bytes"]]
        self._raw = raw
        graph.params.update({v: _aligned(a) for v, a in graph.params.items()})  # one copy, shared
        self._params = list(graph.params.values())
        # constant GEMM operands packed into panels here, once (the layout says which and how)
        self._panels = [_aligned(pack_panels(self._params[p["param"]], PanelSpec(p["k"], p["n"], p["nr"], p["transpose"], p.get("quads", 0), p.get("sums", False)))) for p in layout.get("panels", [])]
        n_in = len(graph.inputs)
        constants = self._params + self._panels
        self._written = [v.type for v, where in zip(graph.outputs, layout["outputs"]) if where["kind"] == "written"]
        self._table = (ctypes.c_void_p * (n_in + len(constants) + 1 + len(self._written)))()
        for i, array in enumerate(constants):
            self._table[n_in + i] = array.ctypes.data
        self._table[n_in + len(constants)] = self._arena.ctypes.data
        self._first_written = n_in + len(constants) + 1
        self._lock = threading.Lock()

    fresh_outputs = True  # run() returns new arrays: written by the kernels, or copied out of the arena

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        written = {where["index"] for where in self.layout["outputs"] if where["kind"] == "donated"}
        # a donated input is written over: it must be writeable (a read-only one is copied first)
        arrays = [np.require(a, requirements=["C", "W"] if i in written else "C") for i, a in enumerate(inputs)]
        written = [_empty_aligned(t.shape, t.dtype.numpy) for t in self._written]
        with self._lock:
            for i, array in enumerate(arrays):
                self._table[i] = array.ctypes.data
            for i, array in enumerate(written):
                self._table[self._first_written + i] = array.ctypes.data
            start = time.perf_counter()
            self._main(ctypes.addressof(self._table))
            if self._profiled:
                self._wall += time.perf_counter() - start
                self._runs += 1
            if self._bounds_error is not None and self._bounds_error.value:
                node = self._checked[self._bounds_error.value - 1]
                raise KilnError(f"node {node} wrote past the end of its output or scratch buffer (KILN_CHECK_BOUNDS): a kernel bug")
            found = {"donated": arrays, "written": written}
            return [found[where["kind"]][where["index"]] if where["kind"] in found else self._read(where, v) for where, v in zip(self.layout["outputs"], self.graph.outputs)]

    def profile(self) -> list[NodeTime]:
        """Time per node over the runs so far, in node order (a build with ``KILN_PROFILE=1``).

        Cycle counts become seconds at the rate the runs' wall time gives, so the shares are
        exact and the milliseconds are as good as the cycle counter is steady."""
        if not self._profiled:
            raise KilnError("no profile: this module was not built with KILN_PROFILE=1")
        with self._lock:
            ticks = list(self._ticks)
            runs, wall = self._runs, self._wall
        total = sum(ticks)
        if not runs or not total:
            return [NodeTime(name, op, 0.0, 0.0) for name, op in self._profiled]
        ms_per_tick = wall * 1e3 / total / runs
        return [NodeTime(name, op, t * ms_per_tick, t / total) for (name, op), t in zip(self._profiled, ticks)]

    def reset_profile(self) -> None:
        with self._lock:
            if self._profiled:
                ctypes.memset(self._ticks, 0, ctypes.sizeof(self._ticks))
                self._runs, self._wall = 0, 0.0

    def _read(self, where: dict, value) -> np.ndarray:
        t = value.type
        if where["kind"] == "param":
            return self._params[where["index"]].copy()
        if where["kind"] == "input":
            raise KilnError("an output that is a graph input has no storage in the arena")
        view = np.frombuffer(self._arena, dtype=t.dtype.numpy, count=t.numel, offset=where["offset"])
        return view.reshape(t.shape).copy()

    def code(self) -> dict[str, bytes]:
        return {"llvm.o": self.object_code, "llvm.json": json.dumps(self.layout).encode()}


def llvm_cache_key(graph: Graph, cpu: CPU) -> str:
    """The cache key of ``graph`` built for ``cpu``: its features, llvmlite and the options."""
    donations = sorted((getattr(graph, "donations", None) or {}).items())
    flags = config.flags()
    options = (f"threads={config.num_threads()}", f"check_bounds={flags.check_bounds}", f"profile={flags.profile}", f"flush_denormals={flags.flush_denormals}", f"donate={donations}")
    return cache_key(graph, cpu.triple, cpu.name, cpu.features, llvmlite.__version__, *options)


class LLVMBackend:
    """``target="llvm"``: compiled CPU code through llvmlite; -O2 by default."""

    name = "llvm"
    default_pipeline = "O2"
    preferred_layout = "auto"  # NHWC where convs are wide: resnet18 1.7x faster, LeNet-5 stays NCHW
    # ops without a kernel expressed through others before any pipeline runs; GEMM operands
    # B made row-major (the micro-kernel streams rows of B: training's g W^T comes transposed;
    # a transposed A, as in x^T g, it reads in place)
    # (recurrent ops unrolled first, so the integer products of a quantized LSTM meet the
    # passes after; QDQ models' convs computed in integers where the CPU has VNNI, while
    # their DequantizeLinear nodes still show the 8-bit operands)
    # (and a unit-stride ConvTranspose, a training step's input gradient, is a Conv by flipped weights)
    lowering = ["decompose_rnn", IntegerProducts(enabled=integer_products_run_here), Decompose(when=decomposes), "row_major_gemm", "conv_transpose_as_conv"]

    def build(self, graph: Graph) -> LLVMExecutable:
        cpu = host_cpu()
        key = llvm_cache_key(graph, cpu)
        hit = load_entry(key)
        if hit is None:
            obj, layout = compile_object(graph, cpu)
            store_entry(key, obj, layout)
        else:
            obj, layout = hit
        return LLVMExecutable(graph, obj, layout)

    def load(self, artifact) -> LLVMExecutable:
        try:
            obj, layout = artifact.code["llvm.o"], json.loads(artifact.code["llvm.json"])
        except (KeyError, ValueError) as err:
            raise ArtifactError(f"an llvm artifact without its object code or layout ({err})") from None
        return LLVMExecutable(artifact.graph, obj, layout)
