"""Graph -> Relax: every node (a fused group is one node) becomes one TIR PrimFunc built from TE
compute definitions, called with ``call_tir`` from one Relax ``main``; reshapes become Relax
reshapes, which the VM runs without a copy.

A lowering is ``fn(ctx, node, inputs) -> te.Tensor | list[te.Tensor]``, registered per op with
``@lowering``: ``inputs`` are TE tensors (None for absent optional inputs), ``node`` gives the
attributes and types, and ``ctx.constant(array)`` hands the kernel a table computed at compile
time (resize taps...). Elementwise ops need no entry: their ``compute`` rule from the op set is
built with ``TEScalarOps``.
"""

from __future__ import annotations

import re
from typing import Callable

import numpy as np
from tvm import relax, te
from tvm.ir import IRModule

from kiln.backends.tvm.scalar import TEScalarOps, dtype_of, tvm_dtype
from kiln.errors import KilnError
from kiln.ir.graph import Graph, Node
from kiln.ir.types import TensorType

Lowering = Callable[["KernelContext", Node, list], "te.Tensor | list[te.Tensor]"]
LOWERINGS: dict[str, Lowering] = {}
SCALAR = TEScalarOps()


def lowering(*ops: str) -> Callable[[Lowering], Lowering]:
    """Register the decorated function as the TE lowering of ``ops``."""

    def wrap(fn: Lowering) -> Lowering:
        for op in ops:
            if op in LOWERINGS:
                raise ValueError(f"two TVM lowerings for {op}")
            LOWERINGS[op] = fn
        return fn

    return wrap


def _load_lowerings() -> None:
    from kiln.backends.tvm import te_image, te_misc, te_nn, te_tensor  # noqa: F401


def has_lowering(node: Node) -> bool:
    _load_lowerings()
    if node.op.name == "Fused":
        return not unsupported_ops(node.attrs["body"])
    if node.op.name in LOWERINGS:
        return _accepts(node)
    return node.op.compute is not None


def _accepts(node: Node) -> bool:
    check = getattr(LOWERINGS[node.op.name], "accepts", None)
    return check is None or check(node)


def unsupported_ops(graph: Graph) -> list[str]:
    """Ops of ``graph`` (fused bodies included) that the TVM backend cannot lower yet."""
    missing: set[str] = set()
    for node in graph.nodes:
        if node.op.name == "Fused":
            missing |= set(unsupported_ops(node.attrs["body"]))
        elif not has_lowering(node):
            missing.add(node.op.name)
    return sorted(missing)


def placeholder(t: TensorType, name: str) -> te.Tensor:
    return te.placeholder(t.shape, tvm_dtype(t.dtype), name=name)


class KernelContext:
    """Collects the compile-time constant tables one kernel reads."""

    def __init__(self) -> None:
        self.constants: list[tuple[te.Tensor, np.ndarray]] = []

    def constant(self, array: np.ndarray, name: str = "table") -> te.Tensor:
        array = np.ascontiguousarray(array)
        tensor = te.placeholder(array.shape, str(array.dtype), name=f"{name}{len(self.constants)}")
        self.constants.append((tensor, array))
        return tensor


def lower_node(ctx: KernelContext, node: Node, inputs: list) -> list[te.Tensor]:
    """``node``'s outputs as TE tensors computed from ``inputs``."""
    _load_lowerings()
    name = node.op.name
    if name == "Fused":
        return _lower_body(ctx, node.attrs["body"], inputs)
    if name in LOWERINGS and _accepts(node):
        out = LOWERINGS[name](ctx, node, inputs)
    elif node.op.compute is not None:
        out = elementwise(node, inputs)
    else:
        raise KilnError(f"node {node.name or name!r}: no TVM lowering for {name} yet")
    outs = list(out) if isinstance(out, (list, tuple)) else [out]
    for value, tensor in zip(node.outputs, outs):
        want = tvm_dtype(value.type.dtype)
        if dtype_of(tensor) != want or tuple(int(d) for d in tensor.shape) != value.type.shape:
            raise KilnError(
                f"internal error: TVM lowering of {name} gave {dtype_of(tensor)}{list(tensor.shape)}, "
                f"node {node.name!r} declares {value.type}"
            )
    return outs


def _lower_body(ctx: KernelContext, body: Graph, inputs: list) -> list[te.Tensor]:
    env: dict[int, te.Tensor] = {id(v): t for v, t in zip(body.inputs, inputs)}
    for value, array in body.params.items():
        env[id(value)] = ctx.constant(array, "param")
    for node in body.nodes:
        outs = lower_node(ctx, node, [env[id(v)] if v is not None else None for v in node.inputs])
        env.update((id(v), t) for v, t in zip(node.outputs, outs))
    return [env[id(v)] for v in body.outputs]


def broadcast_read(x: te.Tensor, index: tuple) -> "te.PrimExpr":
    """``x`` at the output ``index`` under numpy broadcasting (right-aligned, size-1 axes read 0)."""
    shape = [int(d) for d in x.shape]
    tail = index[len(index) - len(shape) :] if shape else ()
    return x(*[0 if n == 1 else i for n, i in zip(shape, tail)])


def elementwise(node: Node, inputs: list) -> te.Tensor:
    out = node.outputs[0].type

    def body(*index):
        operands = [broadcast_read(x, index) if x is not None else None for x in inputs]
        result = node.op.compute(SCALAR, node.attrs, *operands)
        return result if dtype_of(result) == tvm_dtype(out.dtype) else result.astype(tvm_dtype(out.dtype))

    return te.compute(out.shape, body, name=_identifier(node.op.name))


def _identifier(text: str) -> str:
    return re.sub(r"\W", "_", text) or "v"


# -- the Relax module ------------------------------------------------------------------------
def relax_type(t: TensorType) -> relax.TensorType:
    return relax.TensorType(shape=t.shape, dtype=tvm_dtype(t.dtype))


def to_relax(graph: Graph) -> IRModule:
    """``main(inputs..., parameters...)`` returning the tuple of the graph's outputs."""
    bb = relax.BlockBuilder()
    variables: dict[int, relax.Expr] = {}
    params = [relax.Var(_identifier(v.name), relax_type(v.type)) for v in [*graph.inputs, *graph.params]]
    for value, var in zip([*graph.inputs, *graph.params], params):
        variables[id(value)] = var
    with bb.function("main", params):
        with bb.dataflow():
            for node in graph.nodes:
                args = [variables[id(v)] if v is not None else None for v in node.inputs]
                for value, var in zip(node.outputs, _emit(bb, node, args)):
                    variables[id(value)] = var
            result = bb.emit_output(relax.Tuple([variables[id(v)] for v in graph.outputs]))
        bb.emit_func_output(result)
    return bb.get()


def _emit(bb: relax.BlockBuilder, node: Node, args: list) -> list[relax.Expr]:
    if node.op.name == "Reshape" and node.outputs[0].type.numel:  # a view: the VM reshapes without a copy
        return [bb.emit(relax.op.reshape(args[0], node.outputs[0].type.shape))]  # (Relax refuses empty ones: they take the TE copy)
    holders: dict[int, te.Tensor] = {}  # one placeholder per distinct value (Mul(x, x) reads x once)
    call_args = []
    for i, v in enumerate(node.inputs):
        if v is not None and id(v) not in holders:
            holders[id(v)] = placeholder(v.type, f"in{i}")
            call_args.append(args[i])
    ctx = KernelContext()
    outs = lower_node(ctx, node, [holders[id(v)] if v is not None else None for v in node.inputs])
    outs = [_fresh(t, holders.values()) for t in outs]
    tables = [tensor for tensor, _ in ctx.constants]
    func = te.create_prim_func([*holders.values(), *tables, *outs]).without_attr("global_symbol")
    gvar = bb.add_func(func, _identifier(node.name or node.op.name))
    call_args += [relax.const(array, str(array.dtype)) for _, array in ctx.constants]
    out_types = [relax_type(v.type) for v in node.outputs]
    result = bb.emit(relax.call_tir(gvar, call_args, out_types if len(out_types) > 1 else out_types[0]))
    if len(out_types) == 1:
        return [result]
    return [bb.emit(relax.TupleGetItem(result, i)) for i in range(len(out_types))]


def _fresh(tensor: te.Tensor, inputs) -> te.Tensor:
    """An output that is one of the inputs (Identity, a no-op slice) is copied: a PrimFunc
    writes its outputs."""
    if any(tensor.same_as(x) for x in inputs) or tensor.op.__class__.__name__ == "PlaceholderOp":
        return te.compute(tensor.shape, lambda *i: tensor(*i), name="copy")
    return tensor
